"""Bad inputs and faults (issue 15): each ends in one line `online_dpo.py: error: ...` naming the culprit, exit code 1,
no traceback; what a user had is left byte for byte as it was. Runs are online_dpo.run (the command line) in this
process, on the tiny test world: 2 steps, or none when the input is refused before any model loads."""

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import dpo_support.checkpoint
import online_dpo
from dpo_support import checks, http_judge
from tests import assets, rewards
from tests.judges import JudgeServer


def _flags(tiny, out, *extra, reward=("--reward_funcs", "tests.rewards:low_token_ids")):
    return ["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["prompts.jsonl"], *reward,
            "--max_new_tokens", "8", "--max_length", "48", "--per_device_train_batch_size", "4", "--max_steps", "2",
            "--logging_steps", "1", "--save_steps", "0", "--learning_rate", "1e-3", "--eval_prompts", "0",
            "--output_dir", str(out), *extra]


def _refused(capsys, argv, *culprits, code=1):
    """online_dpo.run(argv) ends with exit code `code` and one error line that names every culprit, and no
    traceback."""
    got = online_dpo.run([str(a) for a in argv])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("online_dpo.py: error")]
    assert got == code and len(errors) == 1 and "Traceback" not in captured.err, (got, captured.err[-3000:])
    for culprit in culprits:
        assert culprit in errors[0], errors[0]
    return errors[0], captured.out


def _tree(path):
    """Every file below path and a hash of its bytes (but output_dir/.lock, which a run rewrites)."""
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(path) for f in files if f != ".lock"}


@pytest.fixture
def no_models(monkeypatch):
    """The inputs must be refused before any model loads."""
    def no_loading(*a, **kw):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(online_dpo, "load_model", no_loading)


# ---- dataset contents: every row of the split, before anything loads

@pytest.mark.parametrize("rows, culprits", [
    (['{"prompt": "hello there"}', '{"prompt": [{"role": "user", "content": "hi"}]}'], ["row 1", "mixed"]),
    (['{"prompt": 3}', '{"prompt": 4}'], ["row 0", "the prompt is 3"]),
    (['{"prompt": "a cat"}', '{"prompt": null}'], ["row 1", "the prompt is None"]),
    (['{"prompt": ["a", "b"]}'], ["row 0", "['a', 'b']"]),
    (['{"prompt": [{"role": "user"}]}'], ["row 0", "{'role': 'user'}"]),
    (['{"prompt": [{"role": "user", "content": ""}]}'], ["row 0", "'content': ''"]),
    (['{"prompt": "a cat"}', '{"prompt": "  "}'], ["row 1", "the prompt is '  '"]),
    (['{"prompt": "a cat"}', '{"prompt": "x"', '{"prompt": "y"}'], ["could not read it", "valid jsonl file"]),
])
def test_bad_dataset_rows_are_named(tiny, tmp_path, capsys, no_models, rows, culprits):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(rows) + "\n")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--dataset_name", data), "--dataset_name", *culprits)


def test_data_files_that_are_not_what_they_say(tiny, tmp_path, capsys, no_models):
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--dataset_name", tmp_path / "fake.parquet"), "fake.parquet",
             "could not read it", "valid parquet")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--dataset_name", tmp_path / "prompts.txt"), "prompts.txt",
             "must be .json, .jsonl, .parquet or .csv")
    datasets.Dataset.from_dict({"prompt": [["x"], ["y"]]}).save_to_disk(str(tmp_path / "saved"))
    _refused(capsys, _flags(tiny, tmp_path / "out", "--dataset_name", tmp_path / "saved"), "row 0", "['x']")


# ---- JSON flags: checked like the flags they stand for

@pytest.mark.parametrize("kwargs, culprits", [
    ({"temperature": 0}, ["--generation_kwargs temperature must be >= 1e-4", "got 0"]),
    ({"temperature": None}, ["--generation_kwargs: a null value"]),
    ({"top_p": None}, ["--generation_kwargs: a null value"]),
    ({"eos_token_id": []}, ["eos_token_id []: sampling would never stop"]),
    ({"top_p": 0}, ["--generation_kwargs top_p must be in (0, 1]"]),
    ({"temperature": "hot"}, ["temperature", "'hot'"]),
    ({"temperature": float("nan")}, ["temperature", "nan"]),
    ({"top_k": 2.5}, ["top_k must be an integer"]),
    ({"suppress_tokens": [5, 4000]}, ["suppress_tokens must be token ids in [0, 400)"]),
    ({"suppress_tokens": 5}, ["suppress_tokens"]),
    ({"eos_token_id": -1}, ["eos_token_id"]),
    ({"do_sample": "yes"}, ["do_sample must be true"]),
    ({"do_sample": False}, ["greedy decoding makes both samples the same"]),
])
def test_generation_kwargs_values(tiny, tmp_path, capsys, no_models, kwargs, culprits):
    _refused(capsys, _flags(tiny, tmp_path / "out", "--generation_kwargs", json.dumps(kwargs)), *culprits)


@pytest.mark.parametrize("kwargs, culprits", [
    ({"attn_implementation": "magic"}, ["attn_implementation must be one of eager, sdpa"]),
    ({"frobnicate": 1}, ["'frobnicate' is neither a from_pretrained argument nor a config field"]),
    ({"dtype": "float17"}, ["dtype must be float32 or float64, got 'float17'"]),
    ({"dtype": "float16"}, ["got 'float16'", "--bf16"]),
    ({"torch_dtype": "bfloat16"}, ["got 'bfloat16'"]),
])
def test_model_init_kwargs_values(tiny, tmp_path, capsys, no_models, kwargs, culprits):
    _refused(capsys, _flags(tiny, tmp_path / "out", "--model_init_kwargs", json.dumps(kwargs)), "--model_init_kwargs",
             *culprits)


# ---- numbers

@pytest.mark.parametrize("flag, value, culprit", [
    ("--learning_rate", "nan", "--learning_rate must be >= 0, got nan"),
    ("--learning_rate", "inf", "--learning_rate must be >= 0, got inf"),
    ("--beta", "inf", "--beta must be > 0, got (inf,)"),
    ("--temperature", "inf", "--temperature must be >= 1e-4"),
    ("--temperature", "1e-45", "--temperature must be >= 1e-4 (logits divided by less can overflow), got 1e-45"),
    ("--repetition_penalty", "1e-40", "--repetition_penalty must be >= 1e-4"),
    ("--missing_eos_penalty", "nan", "--missing_eos_penalty must be >= 0"),
    ("--max_grad_norm", "-1", "--max_grad_norm must be >= 0, got -1.0"),
    ("--weight_decay", "-0.1", "--weight_decay must be >= 0"),
    ("--seed", "-1", "--seed must be in [0, 2**32)"),
    ("--seed", str(2**32), "--seed must be in [0, 2**32)"),
    ("--num_train_epochs", "inf", "--num_train_epochs must be finite"),
    ("--reward_weights", "nan", "--reward_weights must be finite"),
])
def test_numbers_out_of_range(tiny, tmp_path, capsys, no_models, flag, value, culprit):
    _refused(capsys, _flags(tiny, tmp_path / "out", flag, value), culprit)


def test_a_run_whose_every_step_was_skipped_saves_nothing(tiny, tmp_path, capsys, monkeypatch):
    loss = online_dpo.dpo_loss
    monkeypatch.setattr(online_dpo, "dpo_loss", lambda *a, **kw: loss(*a, **kw) * float("nan"))
    _refused(capsys, _flags(tiny, tmp_path / "out"), "every one of the 2 steps was skipped (2 NaN/inf")
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_a_run_without_a_preference_in_any_step_says_why(tiny, tmp_path, capsys):
    _refused(capsys, _flags(tiny, tmp_path / "out", "--drop_ties", reward=("--reward_funcs", "tests.rewards:zero")),
             "every one of the 2 steps was skipped (0 NaN/inf, 2 with no preference; the last: the samples tied)")
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_weights_made_nan_by_an_update_stop_the_run(tiny, tmp_path, capsys, monkeypatch):
    step, calls = torch.optim.AdamW.step, []

    def poisoning(self, *a, **kw):
        out = step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning)
    _refused(capsys, _flags(tiny, tmp_path / "out", "--max_steps", "3", "--save_steps", "1"),
             "the update of step 2 made the weights NaN/inf", "checkpoint-1")
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
    assert sorted(d for d in os.listdir(tmp_path / "out") if d.startswith("checkpoint")) == ["checkpoint-1"]


# ---- models in the wrong role

def test_tr_dpo_refuses_a_reference_of_another_shape_before_loading(tiny, tmp_path, capsys, no_models):
    """--sync_ref_model mixes the policy's weights into the reference: one with another number of layers cannot take
    them. Without --sync_ref_model the same reference is fine (it only scores tokens)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny["policy"])
    config.num_hidden_layers += 1
    config.layer_types = config.layer_types + config.layer_types[-1:]
    config.save_pretrained(tmp_path / "deeper")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--ref_model_path", tmp_path / "deeper", "--sync_ref_model"),
             "--sync_ref_model mixes the policy into --ref_model_path, whose num_hidden_layers differs")


def test_a_reward_model_as_reference_or_judge_is_refused(tiny, tmp_path, capsys, no_models):
    _refused(capsys, _flags(tiny, tmp_path / "out", "--ref_model_path", tiny["reward"]), "--ref_model_path",
             "LlamaForSequenceClassification, not a causal LM")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--judge_model_path", tiny["reward"], reward=()),
             "--judge_model_path", "not a causal LM")


def test_a_pad_token_outside_the_embedding_falls_back_to_eos(tiny, tmp_path):
    policy = tmp_path / "policy"
    shutil.copytree(tiny["policy"], policy)
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    tokenizer.add_special_tokens({"pad_token": "<|my_pad|>"})  # id 400: one past the model's 400 embeddings
    tokenizer.save_pretrained(str(policy))
    assert tokenizer.pad_token_id == 400
    argv = _flags(tiny, tmp_path / "out", "--model_name_or_path", policy, "--max_steps", "1")
    assert online_dpo.run([str(a) for a in argv]) == 0


# ---- rewards

def test_a_reward_function_that_breaks_saves_the_last_good_step(tiny, tmp_path, capsys, monkeypatch):
    """It breaks in step 3: checkpoint-2 is written from the state at the start of step 3, so that a resume, with the
    function mended, ends bit for bit where a run that never broke ends."""
    reward = ("--reward_funcs", "tests.rewards:breaks_on_call")
    whole = tmp_path / "whole"
    rewards.CALLS.clear()
    assert online_dpo.run([str(a) for a in _flags(tiny, whole, "--max_steps", "4", reward=reward)]) == 0
    out = tmp_path / "out"
    rewards.CALLS.clear()
    monkeypatch.setenv("FAIL_ON_CALL", "4")  # the trial call, steps 1 and 2, then step 3
    _refused(capsys, _flags(tiny, out, "--max_steps", "4", reward=reward), "step 3: reward function breaks_on_call "
             "fails: ConnectionError: the reward server went away", "saved checkpoint-2", "resume")
    monkeypatch.delenv("FAIL_ON_CALL")
    argv = _flags(tiny, out, "--max_steps", "4", "--resume_from_checkpoint", "latest", reward=reward)
    assert online_dpo.run([str(a) for a in argv]) == 0
    mine, theirs = load_file(str(out / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    lines = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in open(out / "metrics.jsonl")]
    assert lines == [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                     for line in open(whole / "metrics.jsonl")]


def test_an_unscored_completion_ranks_last():
    """None from every reward: NaN, not 0, so a scored completion is chosen over it, whatever its score."""
    def first(prompts, completions, **kw):
        return [None, -1.0, None, -2.0]

    def second(prompts, completions, **kw):
        return [None, None, -5.0, -3.0]

    total, _ = online_dpo.score_completions(["p0", "p1", "p0", "p1"], ["a", "b", "c", "d"], [[1]] * 4, {}, [],
                                            [first, second], torch.ones(2))
    assert math.isnan(total[0]) and total[1:].tolist() == [-1.0, -5.0, -5.0]
    chosen, rejected, tie = online_dpo.pair(total, 2)
    assert chosen.tolist() == [2, 1] and rejected.tolist() == [0, 3] and not tie.any()


def test_steps_without_a_preference_stop_the_run_and_say_why(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, _flags(tiny, out, "--max_steps", "9", reward=("--reward_funcs", "tests.rewards:unscored")),
             "no pair carried a preference in 5 steps in a row (up to step 5)", "no reward scored the completions",
             "saved checkpoint-5")
    logs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["empty_steps"] for m in logs] == [1, 2, 3, 4, 5] and all(m["pairs/unscored"] == 1.0 for m in logs)
    assert not os.path.exists(out / "model.safetensors")


def test_infinite_rewards_keep_metrics_jsonl_valid_json(tiny, tmp_path):
    out = tmp_path / "out"
    argv = _flags(tiny, out, "--eval_steps", "1", reward=("--reward_funcs", "tests.rewards:infinite"))
    assert online_dpo.run([str(a) for a in argv]) == 0

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    for name in ("metrics.jsonl", "completions.jsonl"):
        records = [json.loads(line, parse_constant=refuse) for line in open(out / name)]
        assert records
    assert all(m["objective/scores"] is None for m in map(json.loads, open(out / "metrics.jsonl")))


# ---- judges

def test_an_api_judge_that_is_not_there_is_refused_before_loading(tiny, tmp_path, capsys, no_models):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    judge = ("--judge_api_model", "judge", "--judge_api_retries", "1", "--judge_api_timeout", "0.5")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--judge_api_base", f"http://127.0.0.1:{port}/v1", *judge, reward=()),
             "--judge_api_base", "a trial question failed", "is it running?")
    mute = socket.socket()  # accepts connections, never answers
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    try:
        _refused(capsys, _flags(tiny, tmp_path / "out", "--judge_api_base", f"http://127.0.0.1:{mute.getsockname()[1]}/v1",
                                *judge, reward=()), "a trial question failed", "timed out")
    finally:
        mute.close()


def test_a_step_that_waits_on_the_judge_says_why(tiny, tmp_path, capsys, monkeypatch):
    server = JudgeServer()
    request = http_judge.request

    def slow(text, args, retries=None):
        if "2 + 2?" not in text:  # not the trial question
            time.sleep(1.5)
        return request(text, args, retries)

    monkeypatch.setattr(http_judge, "request", slow)
    monkeypatch.setattr(http_judge, "WAIT_S", 0.2)
    try:
        argv = _flags(tiny, tmp_path / "out", "--judge_api_base", server.url, "--judge_api_model", "judge", "--max_steps",
                      "1", reward=())
        assert online_dpo.run([str(a) for a in argv]) == 0
    finally:
        server.close()
    assert "waiting for the judge at" in capsys.readouterr().out


# ---- files: nothing a user had is lost

def _finished_run(tiny, out):
    assert online_dpo.run([str(a) for a in _flags(tiny, out, "--save_steps", "1")]) == 0
    return _tree(out)


def test_a_finished_run_is_not_overwritten(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    _finished_run(tiny, out)
    os.remove(out / "latest")  # a model and metrics.jsonl, no `latest`
    for name in [n for n in os.listdir(out) if n.startswith("checkpoint")]:
        shutil.rmtree(out / name)
    before = _tree(out)
    _refused(capsys, _flags(tiny, out), "holds an earlier run's config.json and metrics.jsonl", "--overwrite_output_dir")
    assert _tree(out) == before
    os.remove(out / "config.json")
    before = _tree(out)
    _refused(capsys, _flags(tiny, out), "holds an earlier run's metrics.jsonl")
    assert _tree(out) == before


def test_overwriting_keeps_the_earlier_run_until_this_one_has_something(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    before = _finished_run(tiny, out)
    rewards.CALLS.clear()
    monkeypatch.setenv("FAIL_ON_CALL", "2")  # the trial call passes, step 1 breaks
    _refused(capsys, _flags(tiny, out, "--overwrite_output_dir", reward=("--reward_funcs", "tests.rewards:breaks_on_call")),
             "step 1: reward function breaks_on_call fails", "nothing saved")
    assert _tree(out) == before
    # A run that gets to its end replaces everything of the earlier one: no stale checkpoint, no `latest`.
    assert online_dpo.run([str(a) for a in _flags(tiny, out, "--overwrite_output_dir", "--max_steps", "1")]) == 0
    assert sorted(set(os.listdir(out)) - {".lock"}) == sorted(n for n in before if "/" not in n and n != "latest")
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]


def test_inputs_are_never_in_the_output_dir(tiny, tmp_path, capsys, no_models):
    model = tmp_path / "model"
    shutil.copytree(tiny["policy"], model)
    before = _tree(model)
    _refused(capsys, _flags(tiny, model, "--model_name_or_path", model), "--model_name_or_path", "is in --output_dir")
    _refused(capsys, _flags(tiny, tmp_path, "--model_name_or_path", model, "--overwrite_output_dir"),
             "--model_name_or_path", "is in --output_dir")
    assert _tree(model) == before


@pytest.mark.parametrize("damage, culprit", [("missing", "optimizer.pt"), ("truncated", "model.safetensors"),
                                             ("truncated", "rank_states.pt")])
def test_a_damaged_checkpoint_is_named_with_the_one_before(tiny, tmp_path, capsys, two_checkpoints, no_models, damage,
                                                           culprit):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    file = out / "checkpoint-2" / culprit
    if damage == "missing":
        os.remove(file)
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    _refused(capsys, _flags(tiny, out, "--resume_from_checkpoint", "latest", "--save_steps", "1", "--max_steps", "3"),
             f"{culprit} is missing or damaged", "resume from checkpoint-1, the one before")


@pytest.fixture(scope="module")
def two_checkpoints(tiny, tmp_path_factory):
    """A finished 3-step run with checkpoint-1 and checkpoint-2."""
    path = str(tmp_path_factory.mktemp("two_checkpoints") / "out")
    assert online_dpo.run([str(a) for a in _flags(tiny, path, "--save_steps", "1", "--max_steps", "3")]) == 0
    return path


def test_a_full_disk_during_a_checkpoint_keeps_the_one_before(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    save = torch.save

    def full_disk(obj, file, *a, **kw):
        if "checkpoint-2.tmp" in str(file):
            open(file, "wb").write(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")
        return save(obj, file, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    _refused(capsys, _flags(tiny, out, "--save_steps", "1", "--max_steps", "3"), "could not write checkpoint-2",
             "the latest checkpoint is intact", "checkpoint-1")
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-1", "latest", "metrics.jsonl"]  # no checkpoint-2.tmp
    assert open(out / "latest").read() == "checkpoint-1"
    online_dpo.AutoModelForCausalLM.from_pretrained(str(out / "checkpoint-1"))


def test_a_full_disk_at_the_final_save_keeps_the_trained_weights(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    write = dpo_support.checkpoint.write_model

    def full_disk(model, state_dict, tokenizer, args, directory, **kw):
        if directory.endswith("out/.saving"):  # the final save (its temporary is inside output_dir), not a checkpoint
            raise OSError(28, "No space left on device")
        return write(model, state_dict, tokenizer, args, directory, **kw)

    monkeypatch.setattr(dpo_support.checkpoint, "write_model", full_disk)
    _refused(capsys, _flags(tiny, out), "could not write the trained model", "No space left on device",
             "they are in checkpoint-2")
    assert not os.path.exists(out / "model.safetensors") and not os.path.exists(out / ".saving")
    online_dpo.AutoModelForCausalLM.from_pretrained(str(out / "checkpoint-2"))


# ---- environment

def test_a_stale_world_size_without_torchrun(tiny, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--per_device_train_batch_size", "2"),
             "WORLD_SIZE=2 set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not", "or use torchrun")


@pytest.mark.parametrize("env, culprits", [
    ({"RANK": "1"}, ["RANK=1 set but LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not"]),
    ({"WORLD_SIZE": ""}, ["WORLD_SIZE='' is not a whole number"]),
    ({"LOCAL_RANK": "x"}, ["LOCAL_RANK='x' is not a whole number"]),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     ["RANK=2, LOCAL_RANK=0, WORLD_SIZE=2: not 0 <= LOCAL_RANK <= RANK"]),
])
def test_torchrun_variables_are_checked_together(tiny, tmp_path, capsys, monkeypatch, no_models, env, culprits):
    for name in checks.TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _refused(capsys, _flags(tiny, tmp_path / "out"), *culprits, "or use torchrun")
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


def test_printing_in_a_c_locale(tiny, tmp_path):
    """LC_ALL=C without Python's UTF-8 mode: stdout and stderr are ASCII, and a prompt that is not prints escaped."""
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": ["caf\\u00e9"]}\n')
    code = f"import sys, online_dpo; sys.exit(online_dpo.run({[str(a) for a in _flags(tiny, tmp_path / 'out')]!r}))"
    env = os.environ | {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONPATH": os.getcwd()}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run([sys.executable, "-c", code.replace(str(tiny["prompts.jsonl"]), str(data))], env=env,
                          capture_output=True, text=True, errors="replace")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "online_dpo.py: error: --dataset_name" in done.stderr and "caf\\xe9" in done.stderr


# ---- the command line's parser: one line, its suggestion kept, exit code 2

@pytest.mark.parametrize("argv, culprits", [
    (["--preset", "bogus"], ["--preset", "bogus", "tiny"]),
    (["--max_steps", "abc"], ["--max_steps", "abc"]),
    (["--max_stepz", "3"], ["--max_stepz", "did you mean --max_steps"]),
    (["--use_peft", "maybe"], ["--use_peft", "maybe"]),
])
def test_flags_the_parser_refuses(capsys, argv, culprits):
    line, _ = _refused(capsys, argv, *culprits, "see --help", code=2)
    assert "│" not in line and "─" not in line


# ---- user code: SystemExit, KeyboardInterrupt, edits of its arguments, numbers as text

@pytest.mark.parametrize("func, culprits", [
    ("exits", ["reward function exits fails on a trial call", "SystemExit: 0"]),
    ("interrupts", ["reward function interrupts fails on a trial call", "KeyboardInterrupt"]),
    ("number_strings", ["reward function number_strings returned something that is not a number", "'1.5'"]),
])
def test_a_reward_function_that_ends_the_process_is_a_failure(tiny, tmp_path, capsys, no_models, func, culprits):
    _refused(capsys, _flags(tiny, tmp_path / "out", reward=("--reward_funcs", f"tests.rewards:{func}")), *culprits)


def test_a_reward_module_that_exits_at_import(tiny, tmp_path, capsys, no_models):
    module = tmp_path / "quits.py"
    module.write_text("import sys\nsys.exit(0)\n\ndef f(prompts, **kw):\n    return [0.0] * len(prompts)\n")
    _refused(capsys, _flags(tiny, tmp_path / "out", reward=("--reward_funcs", f"{module}:f")), "cannot import",
             "SystemExit: 0")


def test_sys_exit_in_training_saves_the_step_before(tiny, tmp_path, capsys, monkeypatch):
    rewards.CALLS.clear()
    monkeypatch.setattr(rewards, "breaks_on_call", _exits_on(3))  # the trial call, step 1, then step 2
    _refused(capsys, _flags(tiny, tmp_path / "out", reward=("--reward_funcs", "tests.rewards:breaks_on_call")),
             "step 2: reward function", "SystemExit: 0", "saved checkpoint-1")
    assert open(tmp_path / "out" / "latest").read() == "checkpoint-1"


def _exits_on(n):
    def reward(prompts, completions, completion_ids, **kwargs):
        rewards.CALLS.append(1)
        if len(rewards.CALLS) == n:
            sys.exit(0)
        return rewards.low_token_ids(prompts, completions, completion_ids)

    return reward


def _with_test_split(tmp_path, tiny):
    """The tiny prompts as a train and a test split, each row's `split` column naming its split."""
    rows = [json.loads(line) for line in open(tiny["prompts.jsonl"])]
    data = tmp_path / "data"
    data.mkdir()
    for split, part in (("train", rows[:24]), ("test", rows[24:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r | {"split": split}) + "\n" for r in part))
    return data


def test_reward_functions_get_copies_of_their_arguments(tiny, tmp_path, capsys):
    data = _with_test_split(tmp_path, tiny)
    out = tmp_path / "out"
    argv = _flags(tiny, out, "--dataset_name", data, "--eval_prompts", "4", "--eval_steps", "1",
                  reward=("--reward_funcs", "tests.rewards:edits_its_arguments"))
    assert online_dpo.run([str(a) for a in argv]) == 0, capsys.readouterr().err[-2000:]
    held_out = [json.loads(line)["prompt"] for line in open(data / "test.jsonl")][:4]
    shown = capsys.readouterr().out
    assert all(online_dpo.cut(p) in shown for p in held_out)  # the closing report: the prompts as they were


# ---- values that pass a check and would break later

def test_vocabularies_against_their_models(tiny, tmp_path, capsys, no_models):
    from tests import assets

    small = AutoTokenizer.from_pretrained(tiny["tokenizer2"])  # 320 tokens, the policy has 400
    assets.make_causal_lm(str(tmp_path / "ref"), small)
    _refused(capsys, _flags(tiny, tmp_path / "out", "--ref_model_path", tmp_path / "ref"), "--ref_model_path",
             "has 320 token embeddings, fewer than the policy's 400")
    assets.make_reward_model(str(tmp_path / "reward"), small)
    AutoTokenizer.from_pretrained(tiny["policy"]).save_pretrained(tmp_path / "reward")  # 400 > 320
    _refused(capsys, _flags(tiny, tmp_path / "out", reward=("--reward_model_path", tmp_path / "reward")),
             "--reward_model_path", "its tokenizer has 400 tokens, its model 320 embeddings")


# ---- evaluation: a failure names the step and keeps the work

def test_a_reward_function_that_fails_on_held_out_rows_fails_its_trial(tiny, tmp_path, capsys, no_models):
    argv = _flags(tiny, tmp_path / "out", "--dataset_name", _with_test_split(tmp_path, tiny), "--eval_prompts", "4",
                  reward=("--reward_funcs", "tests.rewards:fails_on_held_out"))
    _refused(capsys, argv, "reward function fails_on_held_out fails on a trial call (a 'test' prompt",
             "no answer key")


@pytest.mark.parametrize("fail_on, culprits", [
    ("4", ["step 1, in the comparison with the reference: reward function breaks_on_call fails", "saved checkpoint-1"]),
    ("5", ["reward function breaks_on_call fails", "the trained model is saved in"]),
])
def test_a_comparison_that_fails_keeps_the_work(tiny, tmp_path, capsys, monkeypatch, fail_on, culprits):
    rewards.CALLS.clear()
    monkeypatch.setenv("FAIL_ON_CALL", fail_on)  # 2 trial calls, step 1, then the comparison after it or at the end
    out = tmp_path / "out"
    eval_steps = "1" if fail_on == "4" else "0"
    argv = _flags(tiny, out, "--dataset_name", _with_test_split(tmp_path, tiny), "--eval_prompts", "4",
                  "--eval_steps", eval_steps, "--max_steps", "1" if fail_on == "5" else "2",
                  reward=("--reward_funcs", "tests.rewards:breaks_on_call"))
    _refused(capsys, argv, *culprits)
    saved = out / "checkpoint-1" if fail_on == "4" else out
    online_dpo.AutoModelForCausalLM.from_pretrained(str(saved))


# ---- signals: from the first line of main() to the last

def _raising(monkeypatch, name, sig, when=lambda *a, **kw: True, module=online_dpo):
    """module.`name`, patched to receive signal `sig` on entry (the first call for which `when` holds)."""
    original = getattr(module, name)
    sent = []

    def patched(*args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(sig)
            signal.raise_signal(sig)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)
    return sent


def test_a_signal_while_models_load(tiny, tmp_path, capsys, monkeypatch):
    _raising(monkeypatch, "load_frozen", signal.SIGTERM)
    _refused(capsys, _flags(tiny, tmp_path / "out"), "stopped by SIGTERM before training began: nothing saved",
             code=128 + signal.SIGTERM)
    assert sorted(os.listdir(tmp_path / "out")) == [".lock"]


def test_sighup_in_training_saves_a_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    _raising(monkeypatch, "rollout", signal.SIGHUP)  # in step 1
    assert online_dpo.run([str(a) for a in _flags(tiny, tmp_path / "out", "--max_steps", "3")]) == 0
    assert "stopped by a signal after step 1; saved checkpoint-1" in capsys.readouterr().out
    assert open(tmp_path / "out" / "latest").read() == "checkpoint-1"


def test_sigterm_during_the_final_save_finishes_it(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _raising(monkeypatch, "write_model", signal.SIGTERM, when=lambda *a, **kw: kw.get("merge"),
             module=dpo_support.checkpoint)
    assert online_dpo.run([str(a) for a in _flags(tiny, out)]) == 0
    assert f"stopped by SIGTERM after the final save: the trained model is in {out}" in capsys.readouterr().out
    online_dpo.AutoModelForCausalLM.from_pretrained(str(out))
    assert not os.path.exists(out / ".saving") and not os.path.exists(out / "latest")


def test_ctrl_c_in_the_closing_comparison(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _raising(monkeypatch, "evaluate", signal.SIGINT)
    argv = _flags(tiny, out, "--dataset_name", _with_test_split(tmp_path, tiny), "--eval_prompts", "4")
    assert online_dpo.run([str(a) for a in argv]) == 128 + signal.SIGINT
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and f"the trained model is in {out}" in captured.out
    online_dpo.AutoModelForCausalLM.from_pretrained(str(out))


# ---- paths

def test_a_home_relative_output_dir(tiny, tmp_path, capsys, monkeypatch, no_models):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    _refused(capsys, _flags(tiny, "~/x", "--dataset_name", "./missing.jsonl"), "'./missing.jsonl'",
             "no such file or directory")
    assert (tmp_path / "home" / "x").is_dir() and not os.path.exists(tmp_path / "~")


def test_output_dirs_that_cannot_be_used(tiny, tmp_path, capsys, no_models):
    _refused(capsys, _flags(tiny, "/"), "--output_dir '/' is a root directory")
    os.symlink(tmp_path / "gone", tmp_path / "link")
    _refused(capsys, _flags(tiny, tmp_path / "link"), "is a dangling symlink")


def test_one_run_at_a_time_in_an_output_dir(tiny, tmp_path, capsys, no_models):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # as a running online_dpo.py holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("process 4242 on node-7")
        held.flush()
        _refused(capsys, _flags(tiny, out), "is in use by process 4242 on node-7", "wait for it to end")
    _refused(capsys, _flags(tiny, out, "--max_length", "4"), "--max_new_tokens (8) must be smaller")  # free again


# ---- datasets that are local: their own messages, no Hub hint

def test_local_dataset_problems(tiny, tmp_path, capsys, no_models, monkeypatch):
    out = tmp_path / "out"
    line, _ = _refused(capsys, _flags(tiny, out, "--dataset_name", tmp_path / "missing.jsonl"), "no such file")
    (tmp_path / "empty").mkdir()
    _refused(capsys, _flags(tiny, out, "--dataset_name", tmp_path / "empty"), "is an empty directory")
    data = _with_test_split(tmp_path, tiny)
    (data / "test.jsonl").write_text('{"question": "another schema"}\n')
    other, _ = _refused(capsys, _flags(tiny, out, "--dataset_name", data), "could not read the data files in this "
                        "directory")
    assert "Hub" not in line + other
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "a_file" / "datasets"))
    (tmp_path / "a_file").write_text("")
    _refused(capsys, _flags(tiny, out), "the datasets cache", "is not usable", "HF_HOME")


# ---- notes: one printed line for a silent surprise

def test_notes_before_training(tiny, tmp_path, capsys, no_models):
    _, printed = _refused(capsys, _flags(tiny, tmp_path / "out", "--dataset_config", "en", "--lora_r", "8",
                                         "--max_length", "12", "--per_device_train_batch_size", "1000"),
                          "one optimizer step needs")
    assert "note: --dataset_config 'en' ignored" in printed and "note: --lora_r ignored without --use_peft" in printed
    cut = [line for line in printed.splitlines() if "lose their start" in line]
    assert len(cut) == 1 and "of the first 32 prompts are longer than --max_length - --max_new_tokens = 4" in cut[0]


def test_every_pair_tied_without_drop_ties(tiny, tmp_path, capsys):
    assert online_dpo.run([str(a) for a in _flags(tiny, tmp_path / "out", reward=("--reward_funcs",
                                                                                  "tests.rewards:zero"))]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "every pair tied" in line]
    assert len(notes) == 1 and "--drop_ties" in notes[0]


# ---- resuming: the message names the real cause

def test_resume_messages(tiny, tmp_path, capsys, two_checkpoints, no_models):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    resume = ("--resume_from_checkpoint", "latest", "--save_steps", "1", "--max_steps", "3")
    _refused(capsys, _flags(tiny, out, *resume, "--use_peft"), "belongs to another run",
             "--use_peft is False there and True here")
    (out / "latest").write_text("")
    _refused(capsys, _flags(tiny, out, *resume), "latest' is empty", "checkpoint-1, checkpoint-2")


def test_an_optimizer_state_that_does_not_fit_the_model(tiny, tmp_path, capsys, two_checkpoints):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    saved = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    first = next(iter(saved["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3)
    torch.save(saved, out / "checkpoint-2" / "optimizer.pt")
    before = _tree(out)
    _refused(capsys, _flags(tiny, out, "--resume_from_checkpoint", "latest", "--save_steps", "1", "--max_steps", "3"),
             "optimizer.pt does not fit the model's weights", "(3,)")
    assert _tree(out) == before


# ---- round 3: long prompts, sizes, writes, checks and lines that point the right way

def _write_rows(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def test_long_prompts_are_cut_from_the_left_for_sampling_and_for_feedback(tiny, tokenizer, tmp_path, monkeypatch):
    """Prompts of 100,000 characters: the policy samples from their last max_length - max_new_tokens tokens, and the
    reward function is given exactly that text (not the whole prompt, which would also have asked a reward model for
    an attention matrix of 10^10 entries); a reward model whose positions are fewer than a row's still scores it."""
    words = assets.corpus(4000, seed=5)
    long_prompts = [" ".join(words[i * 40:(i + 1) * 40] * 200)[-100_000:] for i in range(8)]
    assert all(len(p) == 100_000 for p in long_prompts)
    data = _write_rows(tmp_path / "long.jsonl", long_prompts + ["the cat"])  # (not every prompt cut: that is refused)
    short_reward = tmp_path / "short_reward"
    model = AutoModelForSequenceClassification.from_pretrained(tiny["reward"])
    model.config.max_position_embeddings = 40  # fewer than a 40-token prompt plus a completion
    model.save_pretrained(short_reward)
    AutoTokenizer.from_pretrained(tiny["reward"]).save_pretrained(short_reward)
    log = tmp_path / "prompts.jsonl"
    monkeypatch.setenv("REWARD_LOG", str(log))
    argv = _flags(tiny, tmp_path / "out", "--dataset_name", data, "--max_steps", "1", "--max_length", "48",
                  "--per_device_train_batch_size", "8", "--reward_model_path", short_reward,
                  reward=("--reward_funcs", "tests.rewards:logged_prompts"))
    assert online_dpo.run([str(a) for a in argv]) == 0
    calls = [json.loads(line) for line in open(log)]
    trained = calls[-1]  # the step's call (the first is the trial before loading)
    assert len(trained) == 2 * 8 and sum(p != "the cat" for p in trained) >= 14
    for prompt in trained:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert prompt == "the cat" or (30 <= len(ids) <= 48 - 8 and any(p.endswith(prompt) for p in long_prompts))


def test_a_reward_models_input_keeps_the_completion_whole_within_its_positions(tokenizer):
    prompt = " ".join(assets.corpus(40, seed=2))
    completion = " the cat sits near the river."
    text = online_dpo.reward_text(tokenizer, prompt, completion, 30)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 30
    assert text.endswith(completion) and prompt.endswith(text[: -len(completion)]) and len(text) < len(prompt)
    chat = [{"role": "system", "content": prompt}, {"role": "user", "content": "the dog?"}]
    text = online_dpo.reward_text(tokenizer, chat, [{"role": "assistant", "content": completion}], 60)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 60 and "the dog?" in text
    assert completion in text


def test_sizes_the_flags_fix_are_checked_before_any_model_loads(tiny, tmp_path, capsys, no_models):
    _refused(capsys, _flags(tiny, tmp_path / "out", "--num_samples", "100000000"), "--num_samples 100000000",
             "KV cache to sample, more than this machine's", "lower one of them")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--max_length", "1000"),
             "--max_length 1000 is beyond the model's 512 positions")


def test_a_folder_beside_output_dir_named_like_a_temporary_is_left_alone(tiny, tmp_path):
    mine = tmp_path / "out.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert online_dpo.run([str(a) for a in _flags(tiny, tmp_path / "out", "--save_steps", "1")]) == 0
    assert (mine / "notes.txt").read_text() == "mine" and sorted(os.listdir(mine)) == ["notes.txt"]
    assert not os.path.exists(tmp_path / "out" / ".saving")
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))


def test_a_full_disk_inside_safetensors_is_worded_as_any_failed_write(tiny, tmp_path, capsys, monkeypatch):
    import safetensors
    import transformers.modeling_utils

    real = transformers.modeling_utils.safe_save_file

    def full(tensors, filename, *a, **kw):
        if "checkpoint-2" in filename:
            raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = tmp_path / "out"
    _refused(capsys, _flags(tiny, out, "--save_steps", "1", "--max_steps", "3"), "could not write checkpoint-2",
             "SafetensorError", "No space left", f"the latest checkpoint is intact ({out}/checkpoint-1)")
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-1", "latest", "metrics.jsonl"]


def test_old_checkpoints_that_cannot_be_removed_leave_a_note(tiny, tmp_path, capsys, monkeypatch):
    real = dpo_support.checkpoint.remove

    def read_only(path):
        if path.endswith("checkpoint-1"):
            raise OSError(30, "Read-only file system", path)
        return real(path)

    monkeypatch.setattr(dpo_support.checkpoint, "remove", read_only)
    out = tmp_path / "out"
    argv = _flags(tiny, out, "--save_steps", "1", "--max_steps", "3", "--save_total_limit", "1")
    assert online_dpo.run([str(a) for a in argv]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "could not remove" in line]
    assert notes == ["note: could not remove checkpoint-1 for --save_total_limit (OSError: [Errno 30] Read-only file system: "
                     f"'{out}/checkpoint-1'); it stays, and checkpoint-2 is written and intact"]
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("prompt, culprits", [
    ([{"role": "narrator", "content": "hi"}], ["row 0", "message 0 has the unknown role 'narrator'"]),
    ([{"role": "user", "content": "hi"}, {"role": "user"}], ["row 0", "message 1 is {'role': 'user'}"]),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], ["message 1 (assistant) is empty"]),
])
def test_conversations_are_checked_message_by_message(tiny, tmp_path, capsys, no_models, prompt, culprits):
    data = _write_rows(tmp_path / "chat.jsonl", [prompt] + [[{"role": "user", "content": "the cat"}]] * 8)
    error, _ = _refused(capsys, _flags(tiny, tmp_path / "out", "--dataset_name", data), *culprits)
    assert "mixed" not in error


def test_a_prefilled_assistant_turn_gets_a_note(tiny, tmp_path, capsys):
    prefill = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "the dog"}]
    data = _write_rows(tmp_path / "chat.jsonl", [prefill] * 3 + [[{"role": "user", "content": "the sun"}]] * 5)
    assert online_dpo.run([str(a) for a in _flags(tiny, tmp_path / "out", "--dataset_name", data)]) == 0
    assert "note: 3 prompts of the 'train' split end with an assistant message: the completion continues it" in \
        capsys.readouterr().out


def test_models_that_would_fail_later_are_refused_now(tiny, tokenizer, tmp_path, capsys, no_models):
    added = tmp_path / "added"
    shutil.copytree(tiny["policy"], added)
    grown = AutoTokenizer.from_pretrained(tiny["policy"])
    grown.add_tokens(["<new_a>", "<new_b>"])  # ids 400 and 401, past the model's 400 embeddings
    grown.save_pretrained(added)
    _refused(capsys, _flags(tiny, tmp_path / "out", "--model_name_or_path", added), "its tokenizer has 402 tokens",
             "its model 400 embeddings (<new_a>, <new_b> ... have none)")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--model_init_kwargs", '{"attn_implementation": "flex_attention"}'),
             "attn_implementation must be one of eager, sdpa, flash_attention_2, flash_attention_3")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(capsys, _flags(tiny, tmp_path / "out", "--model_name_or_path", empty), "the directory is empty",
             "no saved model")


def test_tr_dpo_flags_that_would_do_nothing(tiny, tmp_path, capsys, no_models):
    _refused(capsys, _flags(tiny, tmp_path / "out", "--sync_ref_model", "--ref_model_mixup_alpha", "0"),
             "--ref_model_mixup_alpha must be in (0, 1]")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--sync_ref_model", "--ref_model_sync_steps", "5"),
             "--ref_model_sync_steps 5 is more than the run's 2 steps")
    _, printed = _refused(capsys, _flags(tiny, tmp_path / "out", "--ref_model_sync_steps", "3",
                                         "--per_device_train_batch_size", "1000"), "one optimizer step needs")
    assert "note: --ref_model_sync_steps ignored without --sync_ref_model" in printed


def test_latest_that_names_nothing_usable(tiny, tmp_path, capsys, two_checkpoints, no_models):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    resume = ("--resume_from_checkpoint", "latest", "--save_steps", "1", "--max_steps", "3")
    shutil.rmtree(out / "checkpoint-2")
    _refused(capsys, _flags(tiny, out, *resume), "latest' names checkpoint-2, which is gone", "there: checkpoint-1")
    (out / "latest").unlink()
    (out / "latest").mkdir()
    _refused(capsys, _flags(tiny, out, *resume), "latest' is a directory", "there: checkpoint-1")
    (out / "latest").rmdir()
    _refused(capsys, _flags(tiny, out, *resume), "has no `latest`", "there: checkpoint-1")


def test_judge_apis_that_point_the_wrong_way(tiny, tmp_path, capsys, no_models):
    import http.server
    import threading

    class Rambles(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"content": "Both are fine, really."}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    judge = ("--judge_api_model", "judge")
    _refused(capsys, _flags(tiny, tmp_path / "out", "--judge_api_base", "localhost:8000/v1", *judge, reward=()),
             "must start with http:// or https://")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Rambles)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        _refused(capsys, _flags(tiny, tmp_path / "out", "--judge_api_base", url, *judge, reward=()),
                 "the judge answered 'Both are fine, really.' to a trial question, not A or B")
    finally:
        server.shutdown()
        server.server_close()
    mute = socket.socket()  # accepts connections, never answers: reported after one timeout, not after the retries
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    start = time.time()
    try:
        _refused(capsys, _flags(tiny, tmp_path / "out", "--judge_api_base", f"http://127.0.0.1:{mute.getsockname()[1]}",
                                *judge, "--judge_api_timeout", "1", "--judge_api_retries", "3", reward=()),
                 "a trial question failed", "timed out")
    finally:
        mute.close()
    assert time.time() - start < 6


def _fails_on_call(monkeypatch, owner, name, n, error):
    """owner.`name`, patched to raise `error` on its n-th call with gradients on (the start-up trials run without)."""
    original = getattr(owner, name)
    calls = []

    def patched(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        if sum(calls) == n:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


@pytest.mark.parametrize("owner, name, error, what", [
    # sampling in step 2 (with --eval_prompts 0, rollout's 2nd call), as CUDA raises it
    (online_dpo, "rollout", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
     "OutOfMemoryError"),
    # the policy's forward in step 2's training, as the CPU allocator raises it
    (online_dpo, "completion_logprobs",
     RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"), "RuntimeError"),
    (torch.Tensor, "backward", MemoryError(), "MemoryError"),  # step 2's backward
])
def test_running_out_of_memory_names_the_levers_and_saves_the_step_before(tiny, tmp_path, capsys, monkeypatch, owner,
                                                                           name, error, what):
    _fails_on_call(monkeypatch, owner, name, 2, error)
    out = tmp_path / "out"
    line, _ = _refused(capsys, _flags(tiny, out, "--max_steps", "3"), "step 2: out of memory", what,
                       "--per_device_train_batch_size", "--generation_batch_size", "--num_samples", "--max_length",
                       "--gradient_checkpointing", "saved checkpoint-1", "--resume_from_checkpoint latest")
    assert open(out / "latest").read() == "checkpoint-1"
    # The checkpoint is the step before: a resume runs steps 2 and 3, and may lower --generation_batch_size.
    monkeypatch.undo()
    assert online_dpo.run([str(a) for a in _flags(tiny, out, "--max_steps", "3", "--resume_from_checkpoint",
                                                  "latest", "--generation_batch_size", "4")]) == 0
    steps = [m["step"] for m in map(json.loads, open(out / "metrics.jsonl")) if "loss" in m]
    assert steps == [1, 2, 3]
