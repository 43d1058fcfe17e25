"""Reward plumbing (reward models with their own tokenizers, reward functions, NaN) and prompt loading."""

import json
import math

import datasets
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dpo_support.checks import load_prompts, load_reward_func
from online_dpo import Args, UsageError, encode_prompts, load_frozen, score_completions
from tests import rewards


@pytest.fixture(scope="module")
def other_rm(tiny):
    """A reward model whose tokenizer differs from the policy's (another vocabulary)."""
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer2_reward"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny["tokenizer2_reward"], num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _score_one(model, tok, text):
    ids = tok(text, add_special_tokens=False, return_tensors="pt")  # one sequence, no padding at all
    with torch.no_grad():
        return model(**ids).logits[0, 0].item()


def test_reward_model_reencodes_with_its_own_tokenizer(other_rm, tokenizer):
    model, tok = other_rm
    assert tok.get_vocab() != tokenizer.get_vocab()
    prompts = ["the cat", "a dog runs near"]
    completions = [" sits on the stone.", " the big old river and the moon"]
    total, per = score_completions(prompts, completions, [[1], [2]], {}, [(model, tok)], [], torch.ones(1))
    for i in range(2):
        assert total[i].item() == pytest.approx(_score_one(model, tok, prompts[i] + completions[i]), abs=1e-5)
    assert torch.equal(total, per[:, 0])


def test_conversational_reward_input_uses_the_reward_tokenizers_chat_template(other_rm):
    model, tok = other_rm
    prompts = [[{"role": "user", "content": "the cat"}], [{"role": "user", "content": "old moon"}]]
    completions = [[{"role": "assistant", "content": "sits"}], [{"role": "assistant", "content": "shines over the tree"}]]
    total, _ = score_completions(prompts, completions, [[1], [2]], {}, [(model, tok)], [], torch.ones(1))
    texts = ["<|user|>the cat<|end|><|assistant|>sits<|end|>", "<|user|>old moon<|end|><|assistant|>shines over the tree<|end|>"]
    for i in range(2):
        assert total[i].item() == pytest.approx(_score_one(model, tok, texts[i]), abs=1e-5)


def test_reward_functions_get_extra_columns_weights_and_nan():
    prompts = ["p0", "p1", "p0", "p1"]
    extra = {"topic": ["sky", "land", "sky", "land"], "id": [0, 1, 0, 1]}
    weights = torch.tensor([2.0, 0.5])
    total, per = score_completions(prompts, ["a", "bb", "ccc", "d"], [[1, 60], [2], [70, 180], [3]], extra, [],
                                   [rewards.with_topic, rewards.low_token_ids], weights)
    assert math.isnan(per[0, 0]) and math.isnan(per[2, 0])  # None -> NaN
    assert per[:, 0].tolist()[1::2] == [0.0, 0.0]
    assert per[:, 1].tolist() == [1.0, 1.0, 0.5, 1.0]
    assert total.tolist() == pytest.approx([0.5 * 1.0, 2 * 0.0 + 0.5 * 1.0, 0.5 * 0.5, 2 * 0.0 + 0.5 * 1.0])


def test_reward_function_that_returns_the_wrong_things_is_named():
    with pytest.raises(UsageError, match="bad_length.*list of 2 numbers"):
        def bad_length(prompts, **kw):
            return [1.0]
        score_completions(["a", "b"], ["x", "y"], [[1], [2]], {}, [], [bad_length], torch.ones(1))
    with pytest.raises(UsageError, match="not_numbers.*not a number"):
        def not_numbers(prompts, **kw):
            return ["good", "bad"]
        score_completions(["a", "b"], ["x", "y"], [[1], [2]], {}, [], [not_numbers], torch.ones(1))


def test_load_reward_func_by_module_and_by_file(monkeypatch, tmp_path):
    assert load_reward_func("tests.rewards:zero") is rewards.zero
    f = tmp_path / "my_rewards.py"
    f.write_text("def length_penalty(completions, **kw):\n    return [-len(c) for c in completions]\n")
    assert load_reward_func(f"{f}:length_penalty")(completions=["ab"]) == [-2]
    monkeypatch.chdir(tmp_path)
    assert load_reward_func("my_rewards:length_penalty")(completions=["abc"]) == [-3]
    for spec, message in [("nope", "expected `module:function`"), ("no_such_module:f", "cannot import"),
                          ("my_rewards:missing", "has no function 'missing'"), (f"{tmp_path}/x.py:f", "cannot import")]:
        with pytest.raises(UsageError, match=message):
            load_reward_func(spec)


def _rows(chat):
    prompt = lambda i: [{"role": "user", "content": f"tree {i}"}] if chat else f"tree {i}"  # noqa: E731
    return [{"prompt": prompt(i), "n": i} for i in range(5)]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "save_to_disk", "save_to_disk_dict", "split_files"])
def test_load_prompts_from_local_files_and_directories(tmp_path, fmt, chat):
    """Train prompts from every local form; the held-out split exists only where the source has a `test` split."""
    rows = _rows(chat)
    ds = datasets.Dataset.from_list(rows)
    if fmt == "split_files":  # a directory of data files named by split, as benchmarks/tiny/prompts
        path = tmp_path / "prompts"
        path.mkdir()
        (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    elif fmt == "jsonl":
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        path = tmp_path / "p.parquet"
        ds.to_parquet(str(path))
    elif fmt == "save_to_disk":
        path = tmp_path / "ds"
        ds.save_to_disk(str(path))
    else:
        path = tmp_path / "dsd"
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    loaded, held_out = load_prompts(Args(dataset_name=str(path)))
    assert loaded["prompt"] == [r["prompt"] for r in rows] and loaded["n"] == list(range(5))
    if fmt in ("save_to_disk_dict", "split_files"):
        assert held_out["prompt"] == [rows[0]["prompt"]]
        assert load_prompts(Args(dataset_name=str(path), dataset_test_split="validation"))[1] is None
    else:
        assert held_out is None


def test_load_prompts_errors_name_the_argument(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(UsageError, match="--dataset_prompt_column 'prompt'.*columns: \\['question'\\]"):
        load_prompts(Args(dataset_name=str(path)))
    assert load_prompts(Args(dataset_name=str(path), dataset_prompt_column="question"))[0]["question"] == ["hi"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(False))}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UsageError, match="--dataset_train_split 'validation'"):
        load_prompts(Args(dataset_name=str(tmp_path / "d"), dataset_train_split="validation"))


def test_encode_prompts_applies_the_chat_template_and_cuts_from_the_left(tokenizer):
    chat = [{"role": "user", "content": "the old river runs under the stone house"}]
    ids, mask = encode_prompts(tokenizer, [chat, "sun"], 6)
    full = tokenizer("<|user|>the old river runs under the stone house<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
    assert len(full) > 6
    assert ids[0].tolist() == full[-6:]  # the generation prompt survives, the start of the conversation goes
    sun = tokenizer("sun", add_special_tokens=False)["input_ids"]
    assert ids[1, -len(sun):].tolist() == sun and mask[1].tolist() == [0] * (6 - len(sun)) + [1] * len(sun)
    no_template = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    no_template.chat_template = None
    with pytest.raises(UsageError, match="chat template"):
        encode_prompts(no_template, [chat], 6)


def test_a_bf16_reward_model_scores_in_fp32(tiny):
    """In a bf16 run the reward model's weights and body run in bf16, but its score head in fp32: each score is the
    float64 product of the body's (bf16) last hidden state with the head, to fp32 accuracy, not rounded to bf16's
    3 significant digits (which ties scores that differ, and --drop_ties drops the pair)."""
    tok = AutoTokenizer.from_pretrained(tiny["reward"])
    model = load_frozen(AutoModelForSequenceClassification, tiny["reward"], Args(), torch.device("cpu"), False, True,
                        num_labels=1, pad_token_id=tok.pad_token_id)
    assert model.dtype == torch.bfloat16
    texts = [f"the old cat number {i} sits near the river" for i in range(16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as run.autocast
        scores, _ = score_completions(texts, [""] * 16, [[1]] * 16, {}, [(model, tok)], [], torch.ones(1))
    batch = tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # (16, L, H) bf16, after the final norm
    last = batch["attention_mask"].sum(1) - 1
    expected = hidden[torch.arange(16), last].double() @ model.score.weight.double()[0]
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-6)
    assert (scores.bfloat16().float() != scores).any()  # finer than bf16
