"""The numbers a step trains on and logs, against references computed here: fused log-probs only where they are the
model's own, every metric over the completions it names (all K x B samples, the scored ones), and what TRL's users
expect (a prefilled assistant turn continued, trainer_state for reward functions, the learning rate a step used)."""

import json
import math
import os

import pytest
import torch
from transformers import FalconH1Config, FalconH1ForCausalLM, GraniteConfig, GraniteForCausalLM

import online_dpo
from dpo_support import checks
from online_dpo import Args, completion_logprobs, conversation, encode_prompts, main, prompt_token_ids

PROMPTS = ["the cat", "a big old dog sits near the river"]


def _scaled_model(arch, tokenizer):
    """A tiny random-init model whose logits are its last hidden states times its output embedding, then scaled:
    Granite divides by logits_scaling, Falcon-H1 multiplies by lm_head_multiplier."""
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    if arch == "granite":
        model = GraniteForCausalLM(GraniteConfig(**common, logits_scaling=8.0))
    else:
        model = FalconH1ForCausalLM(FalconH1Config(**common, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                                   mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8,
                                                   lm_head_multiplier=0.25))
    return model.double().eval()


@pytest.mark.parametrize("arch", ["granite", "falcon_h1"])
def test_a_model_that_scales_its_logits_trains_on_its_own_log_probs(arch, tokenizer, capsys):
    """The trial at start-up finds that the fused log-probs are not the model's, whatever its config calls the scale;
    the training log-probs then equal log_softmax of the model's own logits, in float64, completion by completion,
    each run alone and unpadded. The fused path (what a Granite or Falcon-H1 trained on before) is far off."""
    model = _scaled_model(arch, tokenizer)
    assert checks.logprobs_impl(online_dpo, model) == "naive"
    assert "log-probs from the logits, not fused" in capsys.readouterr().out
    ids, mask = encode_prompts(tokenizer, PROMPTS, 32)
    g = torch.Generator().manual_seed(1)
    completion_ids = torch.randint(3, len(tokenizer), (2, 6), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    got = completion_logprobs(model, ids, mask, completion_ids, completion_mask, impl="naive")
    for i in range(2):
        prompt = ids[i][mask[i].bool()]
        completion = completion_ids[i][completion_mask[i].bool()]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[0].double()
        expected = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(1, completion[:, None]).squeeze(1)
        torch.testing.assert_close(got[i, : len(completion)], expected, rtol=0, atol=1e-9)
        assert (got[i, len(completion):] == 0).all()
    fused = completion_logprobs(model, ids, mask, completion_ids, completion_mask, impl="fused")
    assert (fused - got).abs().max() > 0.1


def test_a_model_whose_logits_are_its_own_keeps_the_fused_log_probs(policy, capsys):
    bf16 = type(policy)(policy.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(policy.state_dict())
    assert checks.logprobs_impl(online_dpo, policy, bf16) == "fused"
    assert "not fused" not in capsys.readouterr().out


def test_a_granite_policy_runs_on_its_logits(tiny, tokenizer, tmp_path, capsys):
    path = str(tmp_path / "granite")
    model = _scaled_model("granite", tokenizer).float()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    args = Args(model_name_or_path=path, dataset_name=tiny["prompts.jsonl"], output_dir=str(tmp_path / "out"),
                reward_funcs=("tests.rewards:low_token_ids",), max_new_tokens=8, max_length=48,
                per_device_train_batch_size=4, max_steps=1, logging_steps=1, save_steps=0, eval_prompts=0)
    main(args)
    assert "log-probs from the logits, not fused: they differ from the model's own" in capsys.readouterr().out
    assert math.isfinite(_metrics(args.output_dir)[0]["loss"])


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_scores_eos_and_lengths_cover_every_sample_and_abstaining_rewards(tiny, tokenizer, tmp_path, monkeypatch):
    """K = 4 samples: objective/scores, val/contain_eos_token and completions/mean_length are means over all K x B
    completions of the step, recomputed here from what the reward function received; a reward that abstains (None)
    leaves its completions out of the score metrics, which stay numbers, and objective/scored says how many it
    scored. Reward functions get TRL's trainer_state: the optimizer steps done."""
    log = tmp_path / "rewards.jsonl"
    monkeypatch.setenv("REWARD_LOG", str(log))
    args = Args(model_name_or_path=tiny["policy"], dataset_name=tiny["prompts.jsonl"],
                reward_funcs=("tests.rewards:logged_abstaining",), output_dir=str(tmp_path / "out"),
                max_new_tokens=8, max_length=48, per_device_train_batch_size=4, num_samples=4, max_steps=3,
                logging_steps=1, save_steps=0, eval_prompts=0, learning_rate=1e-3)
    main(args)
    calls = [json.loads(line) for line in open(log)][1:]  # after the trial call, before the models load
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")}
    assert [c["global_step"] for c in calls] == [0, 1, 2]
    abstained = 0
    for line, call in zip(_metrics(args.output_dir), calls):
        scores = [s for s in call["scores"] if s is not None]
        abstained += len(call["scores"]) - len(scores)
        assert len(call["ids"]) == 4 * 4
        assert line["objective/scores"] == pytest.approx(sum(scores) / len(scores), rel=1e-6)
        assert line["objective/scored"] == pytest.approx(len(scores) / 16)
        assert line["val/contain_eos_token"] == pytest.approx(sum(ids[-1] in stops for ids in call["ids"]) / 16)
        assert line["completions/mean_length"] == pytest.approx(sum(map(len, call["ids"])) / 16)
        assert line["objective/rlhf_reward"] is not None
        # A pair with an unscored completion (it ranks last) has no margin: none of those in a step, no value.
        assert line.get("objective/scores_margin", 0.0) is not None
    assert abstained > 0, "the reward must abstain somewhere for this test to mean anything"


def test_the_logged_learning_rate_is_the_one_the_step_used(tiny, tmp_path):
    """As HF's Trainer logs it: linear warmup over 2 of 4 steps, then linear to 0; step s used the rate of schedule
    step s - 1: 0, 0.5, 1, 0.5 times the peak."""
    args = Args(model_name_or_path=tiny["policy"], dataset_name=tiny["prompts.jsonl"],
                reward_funcs=("tests.rewards:low_token_ids",), output_dir=str(tmp_path / "out"), max_new_tokens=4,
                max_length=48, per_device_train_batch_size=4, max_steps=4, warmup_steps=2, logging_steps=1,
                save_steps=0, eval_prompts=0, learning_rate=1e-3)
    main(args)
    assert [m["learning_rate"] for m in _metrics(args.output_dir)] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])


def test_a_prefilled_assistant_turn_is_continued(tokenizer):
    """A conversation that ends with the assistant's message: the prompt ends with that message's text, its turn
    left open (TRL's continue_final_message), and the reward model reads prefill and completion as one message."""
    prefill = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "the dog sits"}]
    opened = [{"role": "user", "content": "the cat"}]
    text = tokenizer.decode(prompt_token_ids(tokenizer, [prefill])[0])
    assert text.endswith("the dog sits")
    expected = tokenizer.apply_chat_template(opened, tokenize=False, add_generation_prompt=True) + "the dog sits"
    assert text == expected
    merged = conversation(prefill, [{"role": "assistant", "content": " near the river"}])
    assert merged == [opened[0], {"role": "assistant", "content": "the dog sits near the river"}]
    assert conversation(opened, [{"role": "assistant", "content": "x"}]) == opened + [{"role": "assistant",
                                                                                       "content": "x"}]
