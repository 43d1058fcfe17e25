"""The embedded tiny world (benchmarks/tiny, made by benchmarks/tiny_world.py) and the `tiny` preset that trains in it."""

import json
import os
import random
import re
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from online_dpo import PRESETS, TINY_WORLD, Args, Sampling, cli, encode_prompts, main, sample

sys.path.insert(0, os.path.join(os.path.dirname(TINY_WORLD)))
import tiny_world  # noqa: E402  (benchmarks/tiny_world.py)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _test_prompts():
    with open(os.path.join(TINY_WORLD, "prompts", "test.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_the_shipped_world_is_what_the_script_makes(tmp_path):
    """A small rebuild writes the same files, the same kind of models, and byte-identical prompt splits (seeded)."""
    small = tiny_world.build(tiny_world.Build(out=str(tmp_path), dialogues=600, lm_steps=3, rm_steps=3))
    assert _files(tmp_path) == _files(TINY_WORLD)
    for split in ("train", "test"):
        assert (tmp_path / "prompts" / f"{split}.jsonl").read_bytes() == open(f"{TINY_WORLD}/prompts/{split}.jsonl", "rb").read()
    shipped = json.load(open(os.path.join(TINY_WORLD, "build.json")))
    assert shipped.keys() == small.keys() and shipped["seed"] == small["seed"] == 0
    for name in ("policy", "reward"):
        ours, theirs = (json.load(open(os.path.join(root, name, "config.json"))) for root in (tmp_path, TINY_WORLD))
        for key in ("model_type", "architectures", "hidden_size", "num_hidden_layers", "eos_token_id", "pad_token_id"):
            assert ours[key] == theirs[key], (name, key)
    total = sum(os.path.getsize(os.path.join(TINY_WORLD, f)) for f in _files(TINY_WORLD))
    assert total <= 20 * 2**20, f"the tiny world is {total / 2**20:.1f} MB; the budget is 20 MB"


def test_the_shipped_models_load_and_hold_the_world():
    tokenizer = AutoTokenizer.from_pretrained(f"{TINY_WORLD}/policy")
    policy = AutoModelForCausalLM.from_pretrained(f"{TINY_WORLD}/policy").eval()
    reward = AutoModelForSequenceClassification.from_pretrained(f"{TINY_WORLD}/reward").eval()
    assert policy.config.model_type == "qwen2" and reward.config.num_labels == 1
    assert 1e6 < sum(p.numel() for p in policy.parameters()) < 1e7
    chat = [{"role": "user", "content": "Is the red lamp any good?"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        "<|user|>Is the red lamp any good?<|end|><|assistant|>"

    # The reward model has learnt score_response (the rule written out in tiny_world.py) on dialogues about
    # held-out prompts that neither model saw.
    rows = tiny_world.make_corpus([p["prompt"][0]["content"] for p in _test_prompts()], 256, random.Random(123))
    texts = tokenizer.apply_chat_template([r["prompt"] + r["completion"] for r in rows], tokenize=False)
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        predicted = reward(**batch).logits[:, 0]
    rule = torch.tensor([r["score"] for r in rows])
    assert torch.corrcoef(torch.stack([predicted, rule]))[0, 1] > 0.9

    # The policy answers fluently in every style: almost every finished sentence is one the corpus is made of,
    # and positive, negative, rambling and cut-off answers all occur.
    prompts = [p["prompt"] for p in _test_prompts()] * 2
    ids, mask = encode_prompts(tokenizer, prompts, 64)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    out, out_mask = sample(policy, ids, mask, Sampling(64, [end], tokenizer.pad_token_id, temperature=1.0),
                           generator=torch.Generator().manual_seed(0))
    answers = tokenizer.batch_decode([o[m.bool()] for o, m in zip(out, out_mask)], skip_special_tokens=True)
    known = {s.format(p=p, f=f) for s in tiny_world.POSITIVE + tiny_world.NEGATIVE for p in tiny_world.PRODUCTS
             for f in tiny_world.FEATURES}
    known |= set(tiny_world.FILLER) | {s for group in (tiny_world.OPENERS, tiny_world.CLOSERS) for v in group.values() for s in v}
    sentences = [s for a in answers for s in re.findall(r"[^.!?]+[.!?]", a)]
    assert sum(s.strip() in known for s in sentences) / len(sentences) > 0.9
    share = lambda has_style: sum(map(has_style, answers)) / len(answers)  # noqa: E731
    assert share(lambda a: tiny_world.sentiment(a) == 1) > 0.15 and share(lambda a: tiny_world.sentiment(a) == -1) > 0.15
    assert share(lambda a: len(a.split()) > 30) > 0.15  # rambling
    assert share(lambda a: not a.rstrip().endswith((".", "!", "?"))) > 0.05  # cut off


def test_presets_fill_defaults_that_flags_override():
    assert cli([]) == Args() and cli(["--preset", "qwen2-0.5b"]) == Args(preset="qwen2-0.5b")  # the spec's defaults
    tiny = cli(["--preset", "tiny", "--max_steps", "7"])
    assert tiny.max_steps == 7 and tiny.use_cpu and tiny.bf16 is False and tiny.model_name_or_path == f"{TINY_WORLD}/policy"
    tldr = cli(["--preset=pythia-1b-tldr"])
    assert (tldr.model_name_or_path, tldr.reward_model_path, tldr.dataset_name) == (
        "trl-lib/pythia-1b-deduped-tldr-sft", ("trl-lib/pythia-1b-deduped-tldr-rm",), "trl-lib/tldr")
    assert (tldr.max_new_tokens, tldr.missing_eos_penalty, tldr.gradient_accumulation_steps, tldr.warmup_steps,
            tldr.save_steps) == (53, 1.0, 2, 0.1, 0.1)
    quick = cli(["--preset", "qwen2-0.5b"])
    assert (quick.model_name_or_path, quick.dataset_name, quick.learning_rate) == (
        "Qwen/Qwen2-0.5B-Instruct", "trl-lib/ultrafeedback-prompt", 5e-7)
    for name, values in PRESETS.items():
        assert all(getattr(cli(["--preset", name]), k) == v for k, v in values.items())


def _judged_by_the_rule(model_path, tokenizer, prompts, seed=0) -> tuple[float, float]:
    """One sampled answer per prompt, judged by the rule written out in tiny_world.py, not by the reward model.
    -> mean score_response, mean sentiment."""
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ids, mask = encode_prompts(tokenizer, prompts, 64)
    how = Sampling(64, [tokenizer.eos_token_id], tokenizer.pad_token_id, temperature=0.9)
    out, out_mask = sample(model, ids, mask, how, generator=torch.Generator().manual_seed(seed))
    answers = tokenizer.batch_decode([o[m.bool()] for o, m in zip(out, out_mask)], skip_special_tokens=True)
    return (sum(map(tiny_world.score_response, answers)) / len(answers),
            sum(map(tiny_world.sentiment, answers)) / len(answers))


def test_the_tiny_preset_learns(tmp_path, capsys):
    """`--preset tiny` cut from 150 to 40 steps: on the 64 held-out prompts the trained policy beats the reference by
    the reward model (> 0.6) and by the rule it was trained on (> 0.6), its answers turned positive (sentiment
    > +0.3), and the KL stays small.

    How the margins were chosen (2026-11-26, 2 CPU cores). 40-step runs with seeds 42, 1, 2, 3: reward model
    difference +1.19, +1.20, +1.12, +1.10; rule difference +1.17, +1.23, +1.31, +1.15; sentiment shift +0.58, +0.56,
    +0.59, +0.59. Broken updates: preferences drawn at random (a noise reward function instead of the reward model,
    then both policies judged by the reward model; 40 steps, seeds 42, 4, and 25 steps, seeds 1, 2, 3) gave reward
    model differences +0.38, +0.05, +0.18, +0.21, -0.14, rule differences +0.15, -0.03, -0.01, -0.12, -0.22 and
    sentiment shifts between -0.10 and -0.03 (random preferences still favour shorter answers a little, never
    positive ones); the flipped preference (--reward_weights -1, 25 steps) gave -0.90 by the reward model and -0.91
    by the rule. One difference has a paired standard error of about 0.17. (--torch_compile: the policy's decode step
    compiled, its logits within float rounding of eager's, so other samples, learns in the IPO run below.)"""
    out_dir = tmp_path / "tiny"
    main(cli(["--preset", "tiny", "--max_steps", "40", "--output_dir", str(out_dir)]))
    with open(out_dir / "metrics.jsonl") as f:
        *train, final = [json.loads(line) for line in f]
    assert final["eval/reward_trained"] - final["eval/reward_reference"] > 0.6
    assert train[-1]["objective/scores"] > train[0]["objective/scores"] + 0.6
    assert 0 < train[-1]["objective/kl"] < 5  # nats per completion: the policy moved, but stayed near the reference
    printed = capsys.readouterr().out
    assert printed.count("    reference (") == 4 and printed.count("    trained   (") == 4
    assert "mean reward over 64 held-out prompts" in printed

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    prompts = [p["prompt"] for p in _test_prompts()]
    trained_rule, trained_sentiment = _judged_by_the_rule(out_dir, tokenizer, prompts)
    ref_rule, ref_sentiment = _judged_by_the_rule(f"{TINY_WORLD}/policy", tokenizer, prompts)
    assert trained_rule > ref_rule + 0.6 and trained_sentiment > ref_sentiment + 0.3


# The margin of test_the_tiny_preset_learns (its docstring says how it was chosen: preferences drawn at random gave
# at most +0.38). 40-step runs of every objective with seeds 42, 1, 2 (benchmarks/bench_objectives.py --steps 40,
# 2026-12-03, 2 CPU cores) gave reward model differences from +0.94 (robust, seed 1) to +1.43 (the table in
# benchmarks/README.md), win rates 0.72 to 0.81 and a last KL of 0.02 (TR-DPO: its reference follows the policy) to
# 0.85 (RPO): all clear it. The runs below, each objective with a feature (seed 42, 2026-12-07): IPO + RPO + compiled
# +1.40 (win rate 0.81), hinge + GA 4 in one pass +0.88 (0.70), robust + TR-DPO +1.41 (0.81).
MARGIN = 0.6
REFERENCE_REWARD_SEED_42 = -0.5291010147775523  # the reference's mean held-out reward, seed 42, sampled once

# Each objective the sigmoid loss is not, 40 steps (as benchmarks/bench_objectives.py runs them), each with one of
# the features that change how a step samples or what it trains against, so that each also learns end to end:
OBJECTIVES = {
    # RPO's NLL term on IPO's loss, the policy's decode step compiled
    "ipo-rpo-compiled": ["--loss_type", "ipo", "--rpo_alpha", "1.0", "--torch_compile"],
    # the step's 16 prompts as 4 micro-batches of 4, sampled in one pass (issue 39)
    "hinge-ga4": ["--loss_type", "hinge", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4"],
    "robust-tr_dpo": ["--loss_type", "robust", "--label_smoothing", "0.1", "--sync_ref_model",
                      "--ref_model_sync_steps", "8"],
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_the_tiny_preset_learns_with_each_objective(tmp_path, objective):
    """`--preset tiny`, 40 steps, with each objective the sigmoid loss is not: on the 64 held-out prompts the trained
    policy beats the reference by the reward model (by > MARGIN), wins more than half of them, and the KL stays small.
    The reference's answers are the same in every run (seed 42): TR-DPO's comparison is with the reference as the
    run began, not with the one it moved.

    How the margins were chosen: see MARGIN."""
    out_dir = tmp_path / "out"
    main(cli(["--preset", "tiny", "--max_steps", "40", "--output_dir", str(out_dir), *OBJECTIVES[objective]]))
    with open(out_dir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    train, final = [m for m in lines if "loss" in m], lines[-1]
    assert final["eval/reward_trained"] - final["eval/reward_reference"] > MARGIN
    assert final["eval/win_rate"] > 0.5
    tr_dpo = "--sync_ref_model" in OBJECTIVES[objective]
    if "ga4" not in objective:  # (B = 4: its evaluation samples 2B = 8 prompts at a time, not 32, so other draws)
        assert final["eval/reward_reference"] == pytest.approx(REFERENCE_REWARD_SEED_42, abs=1e-4)
    lowest = -1 if tr_dpo else 0  # TR-DPO's KL is to a reference that follows the policy: near 0
    assert lowest < train[-1]["objective/kl"] < 5
    synced = [m["step"] for m in lines if "ref_model_sync" in m]
    assert synced == ([8, 16, 24, 32, 40] if tr_dpo else [])
