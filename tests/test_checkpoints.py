"""Checkpoints: exact resume, crashes at any point of a save, SIGTERM / Ctrl-C, NaN/inf steps.

The reference for every resume is the same run left alone: its metrics.jsonl lines (times aside) and its final
weights, bit for bit (one process, CPU)."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dpo_support.checkpoint
import online_dpo
from dpo_support import checks
from dpo_support.faults import TrainingError
from online_dpo import Args, UsageError, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"model.safetensors", "config.json", "tokenizer.json", "online_dpo_args.json", "optimizer.pt", "rank_states.pt",
         "trainer_state.json"}


def _args(tiny, out, **kw):
    # 32 prompts, 4 per micro-batch x 2 accumulation: 4 steps per epoch, so 6 steps cross an epoch (and a beta) boundary.
    base = dict(model_name_or_path=tiny["policy"], dataset_name=tiny["prompts.jsonl"], output_dir=str(out),
                reward_funcs=("tests.rewards:noisy_low_token_ids",), max_new_tokens=8, max_length=48,
                per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6, logging_steps=2, save_steps=3,
                learning_rate=1e-3, beta=(0.1, 0.2), warmup_steps=1, eval_prompts=0)
    return Args(**base | kw)


def _flags(args: Args) -> list[str]:
    words = []
    for k, v in vars(args).items():
        if v is not None and v != getattr(Args(), k) and k != "preset":
            words += [f"--{k}", *(map(str, v) if isinstance(v, tuple) else [str(v)])]
    return words


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _assert_same_run(out, reference):
    assert _metrics(out) == _metrics(reference)
    mine, theirs = _weights(out), _weights(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _latest(out):
    with open(os.path.join(out, "latest")) as f:
        return os.path.join(out, f.read().strip())


def _assert_complete(path):
    """Everything a resume reads is there and loads."""
    assert FILES <= set(os.listdir(path)), sorted(os.listdir(path))
    with open(os.path.join(path, "trainer_state.json")) as f:
        assert f"checkpoint-{json.load(f)['step']}" == os.path.basename(path)
    torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    torch.load(os.path.join(path, "rank_states.pt"), weights_only=True)
    AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    main(_args(tiny, out))
    return str(out)


def test_resume_continues_exactly(tiny, tmp_path, uninterrupted):
    """checkpoint-3 sits inside an accumulation window (logs at 2, 4, 6) and before the epoch boundary; the reward
    function draws from Python's and NumPy's random streams. A run killed after step 5 left lines up to 5 behind."""
    out = tmp_path / "out"
    shutil.copytree(os.path.join(uninterrupted, "checkpoint-3"), out / "checkpoint-3")
    shutil.copy(os.path.join(uninterrupted, "metrics.jsonl"), out / "metrics.jsonl")
    main(_args(tiny, out, resume_from_checkpoint=str(out / "checkpoint-3")))
    _assert_same_run(str(out), uninterrupted)
    assert _latest(str(out)) == str(out / "checkpoint-3")  # steps 4 and 5 are not saved; 6 is the final save


def test_a_checkpoint_from_before_a_flag_existed_resumes_as_if_it_had_the_default(tiny, tmp_path, uninterrupted):
    """online_dpo_args.json of an older version lacks the flags added since (here --tie_threshold and the HTTP
    judge's): a resume reads them as their defaults, and refuses a value other than the default."""
    out = tmp_path / "out"
    shutil.copytree(os.path.join(uninterrupted, "checkpoint-3"), out / "checkpoint-3")
    shutil.copy(os.path.join(uninterrupted, "metrics.jsonl"), out / "metrics.jsonl")
    saved_args = out / "checkpoint-3" / "online_dpo_args.json"
    older = {k: v for k, v in json.load(open(saved_args)).items() if not k.startswith(("tie_", "judge_api_"))}
    saved_args.write_text(json.dumps(older))
    with pytest.raises(UsageError, match="--tie_threshold is 0.0 there and 0.5 here"):
        main(_args(tiny, out, resume_from_checkpoint=str(out / "checkpoint-3"), tie_threshold=0.5))
    main(_args(tiny, out, resume_from_checkpoint=str(out / "checkpoint-3")))
    _assert_same_run(str(out), uninterrupted)


def test_tr_dpo_moves_the_reference_and_a_resume_across_a_sync_is_exact(tiny, tmp_path):
    """--sync_ref_model every 2 steps (2, 4, 6) with checkpoints at 2 and 4. Each checkpoint's reference/ is
    alpha * its policy + (1 - alpha) * the reference before, exactly (the first one: the model on disk). A run
    resumed from checkpoint-2 crosses the sync at 4 and ends as the uninterrupted run, bit for bit: metrics, the
    reference of checkpoint-4, the final weights."""
    kw = dict(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.6, save_steps=2)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    main(_args(tiny, whole, **kw))
    assert [m["step"] for m in _metrics(str(whole)) if "ref_model_sync" in m] == [2, 4, 6]  # logged when it happens
    before = load_file(os.path.join(tiny["policy"], "model.safetensors"))
    for step in (2, 4):
        checkpoint = os.path.join(whole, f"checkpoint-{step}")
        reference, policy = _weights(os.path.join(checkpoint, "reference")), _weights(checkpoint)
        assert reference.keys() == policy.keys() == before.keys()
        for k in reference:
            assert torch.equal(reference[k], 0.6 * policy[k] + (1 - 0.6) * before[k]), (step, k)
        assert any(not torch.equal(reference[k], before[k]) for k in reference)
        before = reference
    shutil.copytree(os.path.join(whole, "checkpoint-2"), resumed / "checkpoint-2")
    shutil.copy(os.path.join(whole, "metrics.jsonl"), resumed / "metrics.jsonl")
    main(_args(tiny, resumed, resume_from_checkpoint=str(resumed / "checkpoint-2"), **kw))
    _assert_same_run(str(resumed), str(whole))
    again = _weights(os.path.join(resumed, "checkpoint-4", "reference"))
    assert all(torch.equal(again[k], before[k]) for k in before)


def test_a_resume_with_other_eval_prompts_samples_the_reference_answers_again(tmp_path):
    """Checkpoints keep the reference's held-out answers (TR-DPO compares with the reference as it began). A resume
    may change --eval_prompts: it then samples the reference's answers to its own prompts, the same as a run that had
    those prompts from the start."""
    common = ["--preset", "tiny", "--max_steps", "2", "--eval_steps", "1", "--max_new_tokens", "16"]
    main(online_dpo.cli(common + ["--eval_prompts", "4", "--save_steps", "1", "--output_dir", str(tmp_path / "a")]))
    main(online_dpo.cli(common + ["--eval_prompts", "8", "--output_dir", str(tmp_path / "a"),
                                  "--resume_from_checkpoint", "latest"]))
    main(online_dpo.cli(common + ["--eval_prompts", "8", "--output_dir", str(tmp_path / "b")]))
    resumed, fresh = (_metrics(str(tmp_path / name))[-1] for name in "ab")
    assert resumed["eval/reward_reference"] == fresh["eval/reward_reference"]


def test_checkpoints_are_complete_kept_to_the_limit_and_not_overwritten(tiny, tmp_path):
    out = tmp_path / "out"
    main(_args(tiny, out, save_steps=1, save_total_limit=2))
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]
    assert _latest(str(out)) == str(out / "checkpoint-5")
    for name in ("checkpoint-4", "checkpoint-5"):
        _assert_complete(str(out / name))
    with open(out / "checkpoint-5" / "trainer_state.json") as f:
        assert json.load(f)["world_size"] == 1
    # A new run in the same output_dir would delete them: refused unless asked.
    with pytest.raises(UsageError, match="holds checkpoints of an earlier run \\(latest: checkpoint-5\\).*--resume_from_checkpoint latest"):
        main(_args(tiny, out, max_steps=2))
    main(_args(tiny, out, max_steps=2, save_steps=1, overwrite_output_dir=True))
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-1"]
    assert [m["step"] for m in _metrics(str(out))] == [2]


def test_a_checkpoint_of_another_run_is_refused_before_anything_loads(tiny, tmp_path, uninterrupted, monkeypatch):
    def no_loading(*a, **kw):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr(online_dpo, "load_model", no_loading)
    checkpoint = os.path.join(uninterrupted, "checkpoint-3")
    cases = [
        (dict(learning_rate=2e-3), "belongs to another run: --learning_rate is 0.001 there and 0.002 here"),
        (dict(model_name_or_path=tiny["tokenizer2_reward"]), "--model_name_or_path is '.*policy' there and '.*tokenizer2_reward' here"),
        (dict(beta=(0.1,)), r"--beta is \[0.1, 0.2\] there and \[0.1\] here"),
        (dict(resume_from_checkpoint=str(tmp_path / "nowhere")), "nowhere': no such directory"),
        (dict(resume_from_checkpoint=uninterrupted), "not a checkpoint of online_dpo.py"),
        (dict(resume_from_checkpoint="latest", output_dir=str(tmp_path / "new")), "has no checkpoint yet"),
        (dict(overwrite_output_dir=True), "--overwrite_output_dir: give one"),
    ]
    for changes, message in cases:
        with pytest.raises(UsageError, match=message):
            main(replace(_args(tiny, tmp_path / "out", resume_from_checkpoint=checkpoint), **changes))
    # Under torchrun with another number of ranks: refused on every rank, with the same line, before any model loads.
    flags = _flags(_args(tiny, tmp_path / "out", resume_from_checkpoint=checkpoint, per_device_train_batch_size=2))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "online_dpo.py", *flags], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=os.environ | {"PYTHONPATH": REPO})
    lines = set(re.findall(r"^online_dpo.py: error \(rank [01]\): (.*)$", proc.stderr, re.M))
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "it ran on 1 processes and this run has 2 (on rank 0)" in lines.pop()
    assert "Loading weights" not in proc.stderr


def _start(args: Args, before: str = ""):
    """online_dpo.py as a process of its own; `before` runs first in it (to plant a crash)."""
    code = f"import sys, online_dpo\n{before}\ntry:\n    online_dpo.main(online_dpo.cli(sys.argv[1:]))\n" \
           "except online_dpo.UsageError as e:\n    sys.exit(str(e))\n"
    return subprocess.Popen([sys.executable, "-c", code, *_flags(args)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=os.environ | {"PYTHONPATH": REPO})


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.parametrize("where", ["before the rename", "before `latest` moves"])
def test_a_crash_inside_a_save_leaves_the_previous_checkpoint_in_charge(tiny, tmp_path, uninterrupted, where):
    """kill -9 of the process at the two moments that matter: the new checkpoint written but not renamed into place,
    and renamed but not yet named by `latest`. Then resume from `latest`: the run ends as if nothing happened."""
    out = tmp_path / "out"
    args = _args(tiny, out, save_steps=1)
    if where == "before the rename":  # the checkpoint directory's rename
        target, moment = "os.replace", "str(src).endswith('checkpoint-2.tmp')"
    else:  # the rename of latest.tmp over latest
        target, moment = "os.replace", "str(dst).endswith('latest') and open(src).read() == 'checkpoint-2'"
    plant = (f"import os, signal\nreal = {target}\n"
             f"def crash(src, dst, *a, **kw):\n    if {moment}:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
             f"    return real(src, dst, *a, **kw)\n{target} = crash\n")
    code, log = _finish(_start(args, plant))
    assert code == -signal.SIGKILL, log
    assert _latest(str(out)) == str(out / "checkpoint-1")
    _assert_complete(str(out / "checkpoint-1"))
    assert os.path.isdir(out / ("checkpoint-2.tmp" if where == "before the rename" else "checkpoint-2"))
    code, log = _finish(_start(replace(args, resume_from_checkpoint="latest")))
    assert code == 0, log
    assert "resuming from" in log and "checkpoint-1 at step 1" in log
    assert not any(d.endswith(".tmp") for d in os.listdir(out))
    _assert_same_run(str(out), uninterrupted)


def test_kill_9_at_random_moments_then_sigterm_and_ctrl_c(tiny, tmp_path):
    """A run with a checkpoint every step, killed with SIGKILL at random moments (many of them inside a save), resumed
    from `latest` each time; then stopped by SIGTERM (exit 0, a checkpoint of the step it was in) and by SIGINT
    (exit 130); then left to finish. `latest` always names a complete checkpoint, and the end is the uninterrupted run."""
    out, total = tmp_path / "out", 40
    args = _args(tiny, out, save_steps=1, max_steps=total, logging_steps=3)
    main(replace(args, output_dir=str(tmp_path / "reference"), save_steps=0))  # checkpoints change nothing else
    rng = random.Random(0)

    def last_step():
        return int(_latest(str(out)).rsplit("-", 1)[1]) if os.path.exists(out / "latest") else 0

    def resume_and_wait(step):
        proc = _start(replace(args, resume_from_checkpoint="latest") if step > 1 else args)
        while last_step() < step:
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.02)
        return proc

    proc = resume_and_wait(1)
    for _ in range(3):
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        _assert_complete(_latest(str(out)))
        proc = resume_and_wait(last_step() + 1)
    for sig, expected in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
        before = last_step()
        assert before < total - 2, "too few steps left to test the signals: make the run longer"
        proc.send_signal(sig)
        code, log = _finish(proc)
        assert code == expected, log
        assert "stopped by a signal" in log and last_step() > before
        _assert_complete(_latest(str(out)))
        proc = resume_and_wait(last_step() + 1)
    code, log = _finish(proc)
    assert code == 0, log
    _assert_same_run(str(out), str(tmp_path / "reference"))


def test_nan_steps_are_skipped_counted_and_stop_the_run_when_they_persist(tiny, tmp_path, monkeypatch):
    """Steps 2 and 3 get a NaN loss. With a constant learning rate the weights after 3 steps must be those after 1
    step, bit for bit; the metrics count both, and no metric takes the NaN in. Three in a row at the limit of 3: stop."""
    loss, calls = online_dpo.dpo_loss, []

    def sometimes_nan(*a, nan_calls=(), **kw):
        calls.append(1)
        out = loss(*a, **kw)
        return out * float("nan") if len(calls) in nan_calls else out

    common = dict(gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_steps=0)
    main(_args(tiny, tmp_path / "one", max_steps=1, **common))
    monkeypatch.setattr(online_dpo, "dpo_loss", lambda *a, **kw: sometimes_nan(*a, nan_calls=(2, 3), **kw))
    main(_args(tiny, tmp_path / "three", max_steps=3, **common))
    one, three = _weights(str(tmp_path / "one")), _weights(str(tmp_path / "three"))
    assert all(torch.equal(one[k], three[k]) for k in one)
    logs = _metrics(str(tmp_path / "three"))
    assert [m["nonfinite_steps"] for m in logs] == [0, 1, 2]
    assert "loss" in logs[0] and "loss" not in logs[1] and "loss" not in logs[2]
    calls.clear()
    monkeypatch.setattr(online_dpo, "dpo_loss", lambda *a, **kw: sometimes_nan(*a, nan_calls=(2, 3, 4), **kw))
    monkeypatch.setattr(dpo_support.checkpoint, "MAX_NONFINITE_STEPS", 3)
    with pytest.raises(TrainingError, match="NaN/inf in 3 steps in a row \\(up to step 4\\)"):
        main(_args(tiny, tmp_path / "stop", max_steps=6, **common))


def test_weights_with_nan_are_never_saved(tiny, tmp_path):
    args = _args(tiny, tmp_path / "out", max_steps=1)
    policy = main(args)
    before = _weights(args.output_dir)
    with torch.no_grad():
        next(policy.parameters())[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="refusing to save weights with NaN/inf"):
        tokenizer = checks.load_tokenizer(args.output_dir, args, "--model_name_or_path")[0]
        with dpo_support.checkpoint.written_in_place(args.output_dir, merge=True) as tmp:  # as the final save writes
            dpo_support.checkpoint.write_model(policy, None, tokenizer, args, tmp)
    after = _weights(args.output_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("second", ["50 ms later: the same request", "later: stop at once, after the write"])
def test_two_signals_during_a_checkpoint_write_lose_nothing(tiny, tmp_path, uninterrupted, second):
    """Ctrl-C twice while checkpoint-1 is being written. 50 ms apart they are one request: the write finishes, the
    run stops after the next step with its checkpoint, exit 130. A second signal past SAME_REQUEST_S (here made 0)
    stops the run at once, but only once the write in progress is complete: the process ends by SIGINT with
    checkpoint-1 whole and `latest` naming it. Either way the run resumed from `latest` ends as the uninterrupted run,
    bit for bit."""
    out = tmp_path / "out"
    args = _args(tiny, out, save_steps=1)
    same = second.startswith("50 ms")
    plant = ("import os, signal, time\nimport dpo_support.checkpoint, dpo_support.signals\n"
             f"dpo_support.signals.SAME_REQUEST_S = {2.0 if same else 0.0}\n"
             "real = dpo_support.checkpoint.write_model\n"
             "def pressed_twice(*a, **kw):\n"
             "    if a[4].endswith('checkpoint-1.tmp'):\n"
             "        os.kill(os.getpid(), signal.SIGINT)\n        time.sleep(0.05)\n"
             "        os.kill(os.getpid(), signal.SIGINT)\n"
             "    return real(*a, **kw)\n"
             "dpo_support.checkpoint.write_model = pressed_twice\n")
    code, log = _finish(_start(args, plant))
    assert "SIGINT: stopping after this step, with a checkpoint; to stop at once, without one, press Ctrl-C again" \
        in log and "Traceback" not in log
    if same:
        assert code == 130, log
        assert _latest(str(out)) == str(out / "checkpoint-2") and "stopped by a signal after step 2" in log
    else:
        assert code == -signal.SIGINT, log
        assert _latest(str(out)) == str(out / "checkpoint-1")
        assert "error: stopped by a second SIGINT once the write in progress was complete" in log
    _assert_complete(_latest(str(out)))
    code, log = _finish(_start(replace(args, resume_from_checkpoint="latest")))
    assert code == 0, log
    _assert_same_run(str(out), uninterrupted)


def test_one_sampling_pass_per_step_resumes_exactly_with_ga_4(tiny, tmp_path):
    """GA = 4 micro-batches sampled in one pass each step, a checkpoint after step 2 of 4: resumed from it, the run
    writes the same metrics and ends with the same weights, bit for bit."""
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=4, save_steps=2, logging_steps=1)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    main(_args(tiny, whole, **kw))
    shutil.copytree(os.path.join(whole, "checkpoint-2"), resumed / "checkpoint-2")
    shutil.copy(os.path.join(whole, "metrics.jsonl"), resumed / "metrics.jsonl")
    main(_args(tiny, resumed, resume_from_checkpoint=str(resumed / "checkpoint-2"), **kw))
    _assert_same_run(str(resumed), str(whole))
