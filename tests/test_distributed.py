"""Several processes: torchrun, 2 CPU ranks over gloo, DDP and FSDP2, against one process with the global batch.

Each run goes through tests/dist_worker.py, which records on every rank what the policy trained on and its
parameters after training. In its `fixed` mode (completions a function of the prompt, not sampled), 2 ranks x batch
b and 1 process x batch 2b see the same prompts and completions, so their updates must agree. Everything runs in
float64 so that the one difference left, the order of floating-point sums, stays far below the tolerances.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "dist_worker.py")
TIMEOUT = 120  # a rank waiting for another that never comes would hang: fail instead


def _flags(tiny, out, **kw):
    flags = dict(model_name_or_path=tiny["policy"], dataset_name=tiny["prompts.jsonl"], reward_funcs="tests/rewards.py:low_token_ids",
                 model_init_kwargs='{"dtype": "float64"}', output_dir=out, max_new_tokens=8, max_length=48,
                 learning_rate=1e-3, gradient_accumulation_steps=2, max_steps=2, logging_steps=1, save_steps=0,
                 eval_prompts=0, seed=3) | kw
    return [word for k, v in flags.items() for word in (f"--{k}", str(v))]


def _run(out, mode, flags, nproc):
    os.makedirs(out, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run([*launcher, WORKER, out, mode, *flags], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f]
    return logs, [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(nproc)], proc


def _full(ranks, name, shape=None):
    """A parameter as one tensor: FSDP2 shards every parameter in equal row blocks along dim 0, so the shards of the
    ranks, in rank order, concatenate back to it (an independent reading of what get_model_state_dict gathers).
    Replicas (DDP) are equal; so are the shards of a frozen all-zero bias: given the full shape, that one tells."""
    parts = [r["params"][name] for r in ranks]
    if shape is not None:
        return parts[0] if parts[0].shape == shape else torch.cat(parts, 0)
    return parts[0] if len(ranks) == 1 or all(p.shape == parts[0].shape and torch.equal(p, parts[0]) for p in parts) \
        else torch.cat(parts, 0)


def _assert_pairs_from_one_prompt(ranks):
    """Per rank and micro-step: the chosen and the rejected completion answer the same prompt, chosen scores at least
    as high, every prompt gives exactly one pair."""
    for r in ranks:
        for rec in r["records"]:
            B = len(rec["chosen"])
            assert rec["prompt_ids"].shape[0] == 2 * B
            assert torch.equal(rec["prompt_ids"][rec["chosen"]], rec["prompt_ids"][rec["rejected"]])
            assert torch.equal(rec["chosen"] % B, torch.arange(B)) and torch.equal(rec["rejected"] % B, torch.arange(B))
            assert (rec["chosen"] != rec["rejected"]).all()
            assert (rec["scores"][rec["chosen"]] >= rec["scores"][rec["rejected"]]).all()


def _summed(rec, key, rows=slice(None)):
    """Per completion: its log-probs summed over its real tokens."""
    return (rec[key][rows] * rec["completion_mask"][rows]).sum(1).double()


def _prompts(rec):
    return [tuple(ids[m.bool()].tolist()) for ids, m in zip(rec["prompt_ids"], rec["prompt_mask"])]


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """The reference: one process, batch 4 (the global batch of 2 ranks x 2), gradient accumulation 2, 2 steps."""
    out = str(tmp_path_factory.mktemp("one"))
    return _run(out, "fixed", _flags(tiny, out, per_device_train_batch_size=4), nproc=1)


def _compare_with_one_process(one_process, logs, ranks):
    one_logs, (one,), _ = one_process
    logs = [m for m in logs if "loss" in m]  # not --sync_ref_model's lines
    one_logs = [m for m in one_logs if "loss" in m]
    # The same prompts: rank r's micro-step i holds the r-th half of the one process's micro-step i.
    for i, rec in enumerate(one["records"]):
        B = len(rec["chosen"])
        halves = [_prompts(r["records"][i])[: B // 2] for r in ranks]
        assert halves[0] + halves[1] == _prompts(rec)[:B]
        assert not set(halves[0]) & set(halves[1])  # disjoint shards
    # The same update.
    for name, value in one["params"].items():
        full = _full(ranks, name, value.shape)
        assert full.dtype == torch.float64
        torch.testing.assert_close(full, value, rtol=0, atol=1e-10, msg=name)
    # The same logged metrics (times aside).
    assert len(logs) == len(one_logs) == 2
    for a, b in zip(logs, one_logs):
        for k, v in b.items():
            if not k.startswith("time/"):
                assert a[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k  # scores are float32 sums


def test_ddp_two_ranks_train_like_one_process_with_the_global_batch(tiny, tmp_path, one_process):
    out = str(tmp_path / "ddp")
    logs, ranks, _ = _run(out, "fixed", _flags(tiny, out, per_device_train_batch_size=2, distributed="ddp"), nproc=2)
    # DDP keeps the replicas identical, bit for bit, through two steps of two accumulated micro-steps each.
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    _compare_with_one_process(one_process, logs, ranks)
    _assert_pairs_from_one_prompt(ranks)
    # The training moved the weights well beyond the tolerance of the comparison.
    initial = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float64).state_dict()
    assert max((ranks[0]["params"][k] - initial[k]).abs().max() for k in ranks[0]["params"]) > 1e-4


def test_fsdp2_two_ranks_train_like_one_process_and_save_the_gathered_weights(tiny, tmp_path, one_process):
    out = str(tmp_path / "fsdp")
    flags = _flags(tiny, out, per_device_train_batch_size=2, distributed="fsdp")
    logs, ranks, _ = _run(out, "fixed", flags, nproc=2)
    shapes = {name: p.shape for name, p in ranks[0]["params"].items()}
    assert any(ranks[1]["params"][n].shape != s or not torch.equal(ranks[1]["params"][n], p)
               for (n, s), p in zip(shapes.items(), ranks[0]["params"].values())), "the weights were not sharded"
    _compare_with_one_process(one_process, logs, ranks)
    _assert_pairs_from_one_prompt(ranks)
    # Gradient shards after every micro-step's backward: the first micro-step reduce-scattered (with sync off,
    # FSDP2 would hold whole unsharded gradients instead, and the shards' .grad would still be None).
    for r in ranks:
        assert [rec["had_grads"] for rec in r["records"]] == [False, True] * 2
        # The frozen reference's root (embeddings, head) sharded again after each forward, not held gathered.
        assert all(rec["ref_sharded"] for rec in r["records"])
    assert ranks[0]["mesh"] == (2,)
    # The saved model is the gathered one, under save_pretrained's names, and loads with from_pretrained.
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    assert type(saved).__name__ == "Qwen2ForCausalLM"
    for name, value in saved.named_parameters():
        assert torch.equal(value.detach(), _full(ranks, name)), name


TR_DPO = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.6)


@pytest.fixture(scope="module")
def one_process_tr_dpo(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one_tr_dpo"))
    return _run(out, "fixed", _flags(tiny, out, per_device_train_batch_size=4, **TR_DPO), nproc=1)


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_tr_dpo_on_two_ranks_moves_the_reference_like_one_process(tiny, tmp_path, one_process_tr_dpo, one_process,
                                                                  distributed):
    """--sync_ref_model after every step: step 2 scores against the reference that step 1's sync moved. Under FSDP2
    each rank mixes its own shard of the policy into its own shard of the reference, with no gather; 2 ranks must
    still give one process's reference log-probs, metrics and weights."""
    out = str(tmp_path / distributed)
    flags = _flags(tiny, out, per_device_train_batch_size=2, distributed=distributed, **TR_DPO)
    logs, ranks, _ = _run(out, "fixed", flags, nproc=2)
    synced = [m for m in logs if "ref_model_sync" in m]
    assert [m["step"] for m in synced] == [1, 2]
    _compare_with_one_process(one_process_tr_dpo, logs, ranks)
    _, (one,), _ = one_process_tr_dpo
    # Step 2's reference log-probs: those of the moved reference, not the model on disk.
    for i in (2, 3):
        B = len(one["records"][i]["chosen"])
        for r, half in zip(ranks, (slice(0, B // 2), slice(B // 2, B))):
            mine, theirs = r["records"][i], one["records"][i]
            rows = torch.cat([torch.arange(B)[half], B + torch.arange(B)[half]])
            torch.testing.assert_close(_summed(mine, "ref_logps"), _summed(theirs, "ref_logps", rows), rtol=0,
                                       atol=1e-9)
    unmoved = one_process[1][0]  # the same run without --sync_ref_model
    assert torch.equal(_summed(unmoved["records"][1], "ref_logps"), _summed(one["records"][1], "ref_logps"))
    assert not torch.allclose(_summed(unmoved["records"][2], "ref_logps"), _summed(one["records"][2], "ref_logps"))


LORA = dict(use_peft=True, lora_r=4, lora_dropout=0.0, learning_rate=1e-2)
LORA_SCALE = 32 / 4  # --lora_alpha (its default) / --lora_r


@pytest.fixture(scope="module")
def one_process_lora(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one_lora"))
    return _run(out, "fixed", _flags(tiny, out, per_device_train_batch_size=4, **LORA), nproc=1)


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_lora_on_two_ranks_trains_like_one_process(tiny, tmp_path, one_process_lora, distributed):
    """--use_peft under DDP and FSDP2: the same adapters, the same metrics as one process with the global batch, and
    the base weights do not move (but for float rounding: the final save merges the adapters into them in place and
    takes them out again). No adapter dropout here: its masks are drawn per rank."""
    out = str(tmp_path / distributed)
    flags = _flags(tiny, out, per_device_train_batch_size=2, distributed=distributed, **LORA)
    logs, ranks, _ = _run(out, "fixed", flags, nproc=2)
    _compare_with_one_process(one_process_lora, logs, ranks)
    initial = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float64).state_dict()
    names = list(ranks[0]["params"])
    assert any(".lora_B." in n for n in names)
    shapes = {name: one_process_lora[1][0]["params"][name].shape for name in names}
    for name in names:
        full = _full(ranks, name, shapes[name])
        if ".lora_" in name:
            if ".lora_B." in name:
                assert full.abs().max() > 1e-4, name  # the adapters trained
            continue
        adapter = name.replace(".weight", ".lora_A.weight")
        if adapter not in shapes:  # no adapter: never touched
            assert torch.equal(full, initial[name]), name
            continue
        # Merged (W + s B A, addmm_) and taken out again (- s B A) in float64: W is back but for the rounding of those
        # two GEMMs, each within (r + 1) eps (|W| + s |B| |A|) (the rank-r sum accumulated onto W), elementwise.
        A = _full(ranks, adapter, shapes[adapter])
        B = _full(ranks, name.replace(".weight", ".lora_B.weight"), shapes[name.replace(".weight", ".lora_B.weight")])
        r = A.shape[0]
        bound = 2 * (r + 1) * torch.finfo(torch.float64).eps * (initial[name].abs() + LORA_SCALE * B.abs() @ A.abs())
        assert ((full - initial[name]).abs() <= bound).all(), name


def test_metrics_of_two_ranks_are_the_formulas_over_the_global_batch(tiny, tmp_path):
    """Sampled completions (each rank its own random stream), logged values recomputed here from both ranks' records."""
    out = str(tmp_path / "ddp_sampled")
    logs, ranks, _ = _run(out, "sampled", _flags(tiny, out, per_device_train_batch_size=2, max_new_tokens=12), nproc=2)
    _assert_pairs_from_one_prompt(ranks)
    for name, value in ranks[0]["params"].items():  # different completions on each rank, identical replicas after
        assert torch.equal(value, ranks[1]["params"][name]), name
    for step, log in enumerate(logs):
        recs = [rec for r in ranks for rec in r["records"][2 * step : 2 * step + 2]]  # both micro-steps, both ranks
        logp = torch.cat([_summed(r, "logps") for r in recs])
        ref = torch.cat([_summed(r, "ref_logps") for r in recs])
        chosen = torch.cat([_summed(r, "logps", r["chosen"]) - _summed(r, "ref_logps", r["chosen"]) for r in recs])
        rejected = torch.cat([_summed(r, "logps", r["rejected"]) - _summed(r, "ref_logps", r["rejected"]) for r in recs])
        beta = 0.1
        expected = {
            "objective/scores": torch.cat([r["scores"] for r in recs]).double().mean(),
            "objective/kl": (logp - ref).mean(),
            "objective/entropy": -logp.mean(),
            "rewards/margins": (beta * (chosen - rejected)).mean(),
            "rewards/accuracies": (chosen > rejected).double().mean(),
            "loss": torch.nn.functional.logsigmoid(beta * (chosen - rejected)).neg().mean(),
            "val/contain_eos_token": torch.cat([r["has_eos"] for r in recs]).double().mean(),
            "completions/mean_length": torch.cat([r["completion_mask"].sum(1) for r in recs]).double().mean(),
        }
        assert len(recs) == 4 and len(logp) == 4 * 2 * 2  # 2 ranks x 2 micro-steps x 2 prompts x 2 samples
        for k, v in expected.items():
            assert log[k] == pytest.approx(float(v), rel=1e-6, abs=1e-9), k


@pytest.fixture(scope="module")
def uneven_drops(tiny, tmp_path_factory):
    """One step of 16 prompts in one micro-batch, a third of its pairs tied and left out of the loss (--drop_ties)."""
    out = str(tmp_path_factory.mktemp("uneven"))
    return _run(out, "fixed", _uneven_flags(tiny, out, 16, 1), nproc=1)


def _uneven_flags(tiny, out, batch, accumulation, **kw):
    return _flags(tiny, out, reward_funcs="tests/rewards.py:ties_on_short_prompts", drop_ties="True", max_steps=1,
                  per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **kw)


@pytest.mark.parametrize("split", ["8 x GA 2", "8 x 2 DDP ranks", "4 x GA 2 x 2 FSDP2 ranks"])
def test_every_kept_pair_weighs_the_same_whatever_the_split(tiny, tmp_path, uneven_drops, split):
    """The same 16 prompts, completions and preferences, with pairs dropped unevenly, trained as B=16 x GA=1, as
    B=8 x GA=2, on 2 ranks (DDP, FSDP2): the same update, as each kept pair weighs 1 / (the step's kept pairs)."""
    batch, accumulation, nproc, distributed = {"8 x GA 2": (8, 2, 1, "ddp"), "8 x 2 DDP ranks": (8, 1, 2, "ddp"),
                                               "4 x GA 2 x 2 FSDP2 ranks": (4, 2, 2, "fsdp")}[split]
    out = str(tmp_path / "split")
    logs, ranks, _ = _run(out, "fixed", _uneven_flags(tiny, out, batch, accumulation, distributed=distributed),
                          nproc=nproc)
    one_logs, (one,), _ = uneven_drops
    kept = [len(rec["chosen"]) for r in ranks for rec in r["records"]]  # per micro-batch
    assert sum(kept) == len(one["records"][0]["chosen"]) < 16  # the same pairs kept, some dropped
    assert len(set(kept)) > 1, "the dropped pairs must fall unevenly for this test to mean anything"
    for name, value in one["params"].items():
        torch.testing.assert_close(_full(ranks, name, value.shape), value, rtol=0, atol=1e-10, msg=name)
    initial = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float64).state_dict()
    assert max((one["params"][k] - initial[k]).abs().max() for k in one["params"]) > 1e-4  # it moved
    for k in ("loss", "rewards/margins", "objective/kl", "pairs/ties"):
        assert logs[0][k] == pytest.approx(one_logs[0][k], rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("compiled", [False, True])
def test_fsdp2_sampling_with_ranks_that_finish_early_and_sharded_frozen_models(tiny, tmp_path, compiled):
    """Real sampling with a reward model, bf16 mixed precision, sharded reference and reward model, and the
    before/after comparison, which samples the sharded reference: ranks whose completions end at different steps
    must not wait on each other. compiled: the same with --torch_compile, whose graphs (in pieces between FSDP2's
    hooks) compile in step 1 and never again."""
    data = tmp_path / "prompts"
    data.mkdir()
    shutil.copy(tiny["prompts.jsonl"], data / "train.jsonl")
    shutil.copy(tiny["prompts.jsonl"], data / "test.jsonl")
    out = str(tmp_path / "fsdp_sampled")
    flags = _flags(tiny, out, dataset_name=str(data), per_device_train_batch_size=4, distributed="fsdp",
                   reward_model_path=tiny["reward"], model_init_kwargs="{}", bf16=True, max_new_tokens=24,
                   eval_prompts=9, max_steps=3, save_steps=2,
                   generation_kwargs=json.dumps({"eos_token_id": list(range(60))}),  # frequent stops: uneven lengths
                   torch_compile=compiled)
    logs, ranks, proc = _run(out, "sampled", flags, nproc=2)
    if compiled:
        assert "decoding eagerly" not in proc.stdout
        assert len({m["compile/graphs"] for m in logs[:-1]}) == 1 and logs[0]["compile/graphs"] >= 1
    widths = [[rec["completion_ids"].shape[1] for rec in r["records"]] for r in ranks]
    assert widths[0] != widths[1], "no micro-step where one rank stopped decoding before the other: nothing was tested"
    _assert_pairs_from_one_prompt(ranks)
    assert [m["step"] for m in logs[:-1]] == [1, 2, 3] and set(logs[-1]) == {"step", "eval/reward_reference", "eval/reward_trained",
                                                                       "eval/win_rate", "eval/judged"}
    assert "mean reward over 8 held-out prompts" in proc.stdout  # 9 rounded down to a multiple of the 2 ranks
    assert proc.stdout.count("saved the trained model") == 1  # rank 0 alone prints
    for path in (out, os.path.join(out, "checkpoint-2")):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.dtype == torch.float32 and type(model).__name__ == "Qwen2ForCausalLM"


@pytest.mark.parametrize("flags, message", [
    (["--max_new_tokens", "300"], "--max_new_tokens (300) must be smaller than --max_length (48)"),  # before init
    (["--reward_funcs", "tests/rewards.py:one_value_on_batches"], "must return a list of 16 numbers"),  # in step 1
])
def test_a_bad_input_stops_every_rank_with_a_message(tiny, tmp_path, flags, message):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "online_dpo.py",
           "--model_name_or_path", tiny["policy"], "--dataset_name", tiny["prompts.jsonl"], "--max_new_tokens", "4",
           "--max_length", "48", "--output_dir", str(tmp_path / "out"), "--reward_funcs", "tests/rewards.py:zero", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT, env=os.environ | {"PYTHONPATH": REPO})
    assert proc.returncode != 0
    # Each rank says it, but the first rank to exit gets the others stopped by torchrun, maybe before they could.
    assert re.search(r"online_dpo.py: error \(rank [01]\): .*" + re.escape(message), proc.stderr), proc.stderr[-3000:]
    assert 'online_dpo.py", line' not in proc.stderr  # no traceback of ours (torchrun prints its own summary)


@pytest.mark.parametrize("distributed, variant", [("ddp", ""), ("fsdp", ""), ("fsdp", "lora"), ("fsdp", "tr_dpo")])
def test_two_ranks_resume_where_they_stopped(tiny, tmp_path, distributed, variant):
    """Sampled completions (each rank its own random stream), 4 steps with a checkpoint at 2; a second run resumes from
    it. Steps 3 and 4 must be the same: metrics, and every rank's weights (FSDP2: its shard). With LoRA, rank 0 alone
    reads the checkpoint's adapters, and the other ranks get them from it. With TR-DPO (a sync after every step), the
    checkpoint holds the gathered moved reference, which the resumed ranks shard again."""
    extra = dict(per_device_train_batch_size=2, max_steps=4, save_steps=2, distributed=distributed)
    if variant == "lora":
        extra |= dict(use_peft=True, lora_r=4, lora_dropout=0.0, learning_rate=1e-2)
    if variant == "tr_dpo":
        extra |= dict(sync_ref_model=True, ref_model_sync_steps=1)
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    logs, ranks, _ = _run(whole, "sampled", _flags(tiny, whole, **extra), nproc=2)
    shutil.copytree(os.path.join(whole, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    flags = _flags(tiny, resumed, resume_from_checkpoint=os.path.join(resumed, "checkpoint-2"), **extra)
    again, ranks_again, proc = _run(resumed, "sampled", flags, nproc=2)
    if variant == "tr_dpo":
        assert [m["step"] for m in again if "ref_model_sync" in m] == [3, 4]
        logs, again = ([m for m in lines if "loss" in m] for lines in (logs, again))
    assert "resuming from" in proc.stdout and [m["step"] for m in again] == [3, 4]
    _assert_same_run(again, logs[2:], ranks_again, ranks)
    assert [len(r["records"]) for r in ranks_again] == [4, 4]  # 2 steps x 2 micro-steps: nothing replayed


def _assert_same_run(lines, expected_lines, ranks, expected_ranks):
    """The metrics lines (times aside) to 1e-9 and every rank's weights to 1e-10 (float64) of the expected run's."""
    for a, b in zip(lines, expected_lines, strict=True):
        for k, v in b.items():
            if not k.startswith("time/"):
                assert a[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    for r, r_expected in zip(ranks, expected_ranks, strict=True):
        for name, value in r_expected["params"].items():
            torch.testing.assert_close(r["params"][name], value, rtol=0, atol=1e-10, msg=name)


def test_a_checkpoint_before_any_update_leaves_the_ddp_replicas_equal(tiny, tmp_path):
    """Step 1 keeps no pair (all tied, --drop_ties), and its checkpoint reads an optimizer state that no update has
    made yet. Reading an empty state initialises it with a zero-lr step: if rank 0 alone took it, its Adam step count
    would run one ahead, and from step 2 on its updates (and weights) would differ from rank 1's."""
    out = str(tmp_path / "out")
    flags = _flags(tiny, out, reward_funcs="tests/rewards.py:ties_on_the_first_step", drop_ties=True,
                   gradient_accumulation_steps=1, per_device_train_batch_size=2, max_steps=3, save_steps=1)
    logs, ranks, _ = _run(out, "sampled", flags, nproc=2)
    assert [m["empty_steps"] for m in logs] == [1, 1, 1]  # step 1 alone was empty
    assert os.path.isdir(os.path.join(out, "checkpoint-1"))
    assert any(not torch.equal(value, ranks[0]["params"][name]) for name, value in _initial(tiny).items())
    for name, value in ranks[0]["params"].items():
        assert torch.equal(ranks[1]["params"][name], value), name


@pytest.mark.parametrize("reward, line", [
    ("fails_on_rank_1_in_step_3", "step 3: reward function fails_on_rank_1_in_step_3 fails: ConnectionError: the "
     "reward server is unreachable from this node (on rank 1); saved checkpoint-2"),
    ("sampling_oom_on_rank_1_in_step_3", "step 3: out of memory (OutOfMemoryError: CUDA out of memory. Tried to "
     "allocate 20.00 GiB); lower --per_device_train_batch_size (or --generation_batch_size), --num_samples or "
     "--max_length, or keep --gradient_checkpointing on (on rank 1); saved checkpoint-2"),
])
def test_a_failure_on_one_rank_in_feedback_or_sampling_stops_every_rank_with_the_step_before_saved(tiny, tmp_path,
                                                                                                   reward, line):
    """Rank 1's reward function raises in step 3, or rank 1 runs out of memory while it samples step 3; rank 0 does
    not. Both ranks must stop there (not wait in the next collective), each with the same line, which names the
    failing rank, and checkpoint-2 saved for a resume."""
    out = str(tmp_path / "out")
    flags = _flags(tiny, out, reward_funcs=f"tests/rewards.py:{reward}", gradient_accumulation_steps=1,
                   per_device_train_batch_size=2, max_steps=5, distributed="fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "online_dpo.py", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT, env=os.environ | {"PYTHONPATH": REPO})
    assert proc.returncode != 0
    lines = {int(m[1]): m[2] for m in re.finditer(r"^online_dpo.py: error \(rank (\d)\): (.*)$", proc.stderr, re.M)}
    assert set(lines) == {0, 1}, proc.stderr[-3000:]
    assert lines[0] == lines[1]
    assert lines[0].startswith(line), lines[0]
    with open(os.path.join(out, "checkpoint-2", "trainer_state.json")) as f:
        assert json.load(f)["step"] == 2
    assert AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-2")).num_parameters() > 0
    with open(os.path.join(out, "latest")) as f:
        assert f.read().strip() == "checkpoint-2"
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_out_of_memory_in_training_on_one_rank_ends_it_with_its_line_and_the_checkpoint_intact(tiny, tmp_path):
    """Rank 1 runs out of memory in the policy's forward of step 3, where the ranks cannot meet to agree (rank 0
    waits in a collective): rank 1 says so in one line naming the levers and the latest checkpoint, intact; rank 0
    that another rank stopped."""
    out = str(tmp_path / "out")
    flags = _flags(tiny, out, reward_funcs="tests/rewards.py:training_oom_on_rank_1_in_step_3",
                   gradient_accumulation_steps=1, per_device_train_batch_size=2, max_steps=5, save_steps=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "online_dpo.py", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT, env=os.environ | {"PYTHONPATH": REPO})
    assert proc.returncode != 0
    lines = {int(m[1]): m[2] for m in re.finditer(r"^online_dpo.py: error \(rank (\d)\): (.*)$", proc.stderr, re.M)}
    assert lines[1] == ("step 3: out of memory (RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to "
                        "allocate 9 GB); lower --per_device_train_batch_size (or --generation_batch_size), --num_samples "
                        "or --max_length, or keep --gradient_checkpointing on (on rank 1); the latest checkpoint is "
                        f"intact ({out}/checkpoint-2)"), proc.stderr[-3000:]
    if 0 in lines:  # (torchrun may stop rank 0 before it says anything)
        assert "another rank stopped" in lines[0], lines[0]
    with open(os.path.join(out, "latest")) as f:
        assert f.read().strip() == "checkpoint-2"
    assert AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-2")).num_parameters() > 0


def _two_nodes(mode, flags, cwds=(REPO, REPO), out=None):
    """2 nodes x 2 ranks on localhost: two torchrun agents meeting at one c10d rendezvous, as on two machines.
    Returns both agents' processes and, given out, every rank's record (tests/dist_worker.py); without out, the
    ranks run online_dpo.py itself, so that an error ends in its one line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend",
           "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes"]
    if out is None:
        cmd += [os.path.join(REPO, "online_dpo.py"), *flags]
    else:
        cmd += [WORKER, out, mode, *flags]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    agents = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for cwd in cwds]
    procs = [subprocess.CompletedProcess(cmd, a.wait(timeout=3 * TIMEOUT), *a.communicate()) for a in agents]
    if out is None:
        return procs, None
    for p in procs:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return procs, [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(4)]


def test_two_nodes_shard_within_a_node_replicate_across_and_resume(tiny, tmp_path):
    """FSDP2 on 2 nodes x 2 ranks: a 2-D (HSDP) mesh, whose replicas (ranks 0 and 2, 1 and 3) stay equal; a resume
    from checkpoint-2 ends where the uninterrupted run did. Then a resume that one node cannot see (each node its own
    output_dir, as without a shared filesystem) is refused on both nodes with the same line."""
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    extra = dict(reward_funcs="tests.rewards:low_token_ids", per_device_train_batch_size=2, gradient_accumulation_steps=1,
                 max_steps=3, save_steps=2, distributed="fsdp")
    _, ranks = _two_nodes("sampled", _flags(tiny, whole, **extra), out=whole)
    assert {r["mesh"] for r in ranks} == {(2, 2)}
    for name, value in ranks[0]["params"].items():
        assert torch.equal(ranks[2]["params"][name], value) and torch.equal(ranks[3]["params"][name],
                                                                            ranks[1]["params"][name]), name
    assert any(not torch.equal(ranks[1]["params"][n], v) for n, v in ranks[0]["params"].items()), "not sharded"
    shutil.copytree(os.path.join(whole, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    flags = _flags(tiny, resumed, resume_from_checkpoint=os.path.join(resumed, "checkpoint-2"), **extra)
    procs, again = _two_nodes("sampled", flags, out=resumed)
    assert "resuming from" in procs[0].stdout + procs[1].stdout
    for r, r_again in zip(ranks, again):
        for name, value in r["params"].items():
            torch.testing.assert_close(r_again["params"][name], value, rtol=0, atol=1e-10, msg=name)
    # Node-local output_dirs: one node's holds the checkpoint, the other's is empty.
    cwds = [tmp_path / "node_a", tmp_path / "node_b"]
    shutil.copytree(whole, cwds[0] / "out", ignore=shutil.ignore_patterns("rank[0-9].pt", ".lock"))
    cwds[1].mkdir()
    procs, _ = _two_nodes(None, _flags(tiny, "out", **extra, resume_from_checkpoint="latest"), cwds=cwds)
    # Every node says it (each rank prints before any exits; a line torchrun cut anyway is not required), the same.
    lines = [re.findall(r"^online_dpo.py: error \(rank \d\): (.*)$", p.stderr, re.M) for p in procs]
    if not (all(p.returncode != 0 for p in procs) and all(lines) and len({x for ls in lines for x in ls}) == 1):
        pytest.fail("\n=====\n".join(p.stderr[-6000:] for p in procs), pytrace=False)
    assert "several nodes need an --output_dir that all of them see" in lines[0][0]
    # Each node sees a checkpoint, but not the same one.
    shutil.copytree(cwds[0] / "out", cwds[1] / "out", dirs_exist_ok=True)
    os.rename(cwds[1] / "out" / "checkpoint-2", cwds[1] / "out" / "checkpoint-1")
    (cwds[1] / "out" / "latest").write_text("checkpoint-1")
    procs, _ = _two_nodes(None, _flags(tiny, "out", **extra, resume_from_checkpoint="latest"), cwds=cwds)
    lines = {line for p in procs for line in re.findall(r"^online_dpo.py: error \(rank \d\): (.*)$", p.stderr, re.M)}
    if len(lines) != 1:
        pytest.fail("\n=====\n".join(p.stderr[-6000:] for p in procs), pytrace=False)
    assert "ranks see different checkpoints (rank 0: checkpoint-" in lines.pop()


def test_rank_0_reads_the_weights_and_every_rank_gets_the_same(tiny, tmp_path):
    """Under torchrun only rank 0 reads a model's weights (the others build it on the meta device): after loading,
    every rank's model, sharded (FSDP2) or whole, gathers to exactly what from_pretrained reads, its rotary
    buffers (in no state dict) too, and tied embeddings stay tied."""
    out = str(tmp_path / "loaded")
    os.makedirs(out)
    flags = _flags(tiny, out, reward_model_path=tiny["reward"], distributed="fsdp")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, out, "loaded",
           *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    policy = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float64)
    reward = AutoModelForSequenceClassification.from_pretrained(tiny["reward"], num_labels=1)
    for r in range(2):
        record = torch.load(os.path.join(out, f"rank{r}.pt"))
        for name, loaded in record.items():
            reference = policy if name.startswith("policy") else reward
            expected = reference.state_dict()
            assert set(loaded["weights"]) <= set(expected), name
            for key, value in loaded["weights"].items():
                assert torch.equal(value, expected[key]), (r, name, key)
            for key, value in reference.named_buffers():
                assert torch.equal(loaded["buffers"][key], value), (r, name, key)
        assert record["policy_fsdp"]["tied"] and record["policy_ddp"]["tied"]


def _initial(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float64)
    return {name: p.detach() for name, p in model.named_parameters()}


def test_collectives_wait_long_enough_for_rank_0_to_write_a_checkpoint(monkeypatch):
    """NCCL's default timeout (10 minutes) is shorter than writing a large checkpoint; the group gets an hour."""
    import online_dpo

    calls = []
    monkeypatch.setattr(online_dpo.dist, "init_process_group", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(online_dpo.dist, "is_initialized", lambda: False)
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    online_dpo.init_distributed(online_dpo.Args(use_cpu=True))
    assert calls[0]["timeout"].total_seconds() >= 3600


def _workers(launcher_pid):
    """{RANK: pid} of the processes that torchrun started."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if parent == launcher_pid and b"RANK" in env:
            found[int(env[b"RANK"])] = int(pid)
    return found


def test_sigterm_to_one_rank_checkpoints_all_of_them_and_exits_0(tiny, tmp_path):
    """Preemption may reach one process only: the step ends on every rank, they save together and all exit 0."""
    out = str(tmp_path / "out")
    proc = _start_torchrun(tiny, out, max_steps=500, save_steps=0)
    os.kill(_workers(proc.pid)[1], signal.SIGTERM)
    log = _wait(proc)
    assert proc.returncode == 0, log[-3000:]
    with open(os.path.join(out, "latest")) as f:
        checkpoint = os.path.join(out, f.read().strip())
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        step = json.load(f)["step"]
    assert 1 <= step < 500 and "stopped by a signal after step" in log
    assert len(torch.load(os.path.join(checkpoint, "rank_states.pt"), weights_only=True)) == 2
    AutoModelForCausalLM.from_pretrained(checkpoint)


def _start_torchrun(tiny, out, worker=True, **kw):
    """2 ranks in a session of their own (a terminal's process group), with a checkpoint every step unless kw says
    otherwise; through dist_worker.py (which records), or online_dpo.py itself. Returns once step 1 is logged."""
    flags = _flags(tiny, out, **{"per_device_train_batch_size": 2, "save_steps": 1} | kw)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = [WORKER, out, "sampled"] if worker else [os.path.join(REPO, "online_dpo.py")]
    proc = subprocess.Popen([*launcher, *script, *flags], cwd=REPO, text=True, start_new_session=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + TIMEOUT
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):  # past step 1: the handlers are in place
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    return proc


def _wait(proc):
    try:
        return proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the ranks did not stop:\n" + proc.communicate()[0][-3000:])


def test_ctrl_c_twice_under_torchrun_saves_the_step_on_every_rank_and_resumes_exactly(tiny, tmp_path):
    """The key press of a terminal reaches torchrun and both ranks (SIGINT to the process group), twice 50 ms apart;
    torchrun then sends each rank SIGTERM. All of it is one request: both ranks finish the step, save it together and
    exit, with one line saying so. Resumed from `latest`, the run ends as an uninterrupted one (to 1e-10 in float64,
    as every resume under torchrun)."""
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    logs, ranks, _ = _run(whole, "sampled", _flags(tiny, whole, per_device_train_batch_size=2, save_steps=1,
                                                   max_steps=12), nproc=2)
    proc = _start_torchrun(tiny, stopped, max_steps=12)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    log = _wait(proc)
    assert log.count("SIGINT: stopping after this step, with a checkpoint") == 1, log[-3000:]
    assert "online_dpo.py: error" not in log, log[-3000:]
    with open(os.path.join(stopped, "latest")) as f:
        checkpoint = os.path.join(stopped, f.read().strip())
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        step = json.load(f)["step"]
    assert 1 <= step < 12 and len(torch.load(os.path.join(checkpoint, "rank_states.pt"), weights_only=True)) == 2
    flags = _flags(tiny, stopped, per_device_train_batch_size=2, save_steps=1, max_steps=12,
                   resume_from_checkpoint="latest")
    again, ranks_again, _ = _run(stopped, "sampled", flags, nproc=2)
    assert [m["step"] for m in again] == list(range(1, 13))  # the lines of the first part, kept, then the rest
    _assert_same_run(again, logs, ranks_again, ranks)


def test_a_rank_killed_leaves_a_line_on_the_other_naming_the_checkpoint_intact(tiny, tmp_path):
    out = str(tmp_path / "out")
    proc = _start_torchrun(tiny, out, worker=False, max_steps=500)
    os.kill(_workers(proc.pid)[1], signal.SIGKILL)
    log = _wait(proc)
    lines = [line for line in log.splitlines() if line.startswith("online_dpo.py: error (rank 0)")]
    assert len(lines) == 1 and "a collective across the ranks failed" in lines[0], log[-3000:]
    assert "another rank stopped or lost its connection" in lines[0] and "checkpoint-" in lines[0]
