"""Whole runs of online_dpo.py: in process for the metric checks, as a subprocess for the CLI."""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

import online_dpo
from dpo_support.checks import check_args
from online_dpo import Args, UsageError, cli, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _args(tiny, tmp_path, **kw):
    base = dict(model_name_or_path=tiny["policy"], dataset_name=tiny["prompts.jsonl"], reward_funcs=("tests.rewards:low_token_ids",),
                output_dir=str(tmp_path / "out"), max_new_tokens=8, max_length=48, per_device_train_batch_size=4,
                max_steps=2, logging_steps=1, save_steps=0, learning_rate=1e-3)
    return Args(**base | kw)


def test_first_step_policy_equals_reference(tiny, tmp_path):
    """At step 1 the policy is the reference: kl = 0, implicit rewards = 0, sigmoid loss = ln 2.

    Two reward models (one with another tokenizer) and a reward function, conversational prompts."""
    args = _args(tiny, tmp_path, dataset_name=tiny["prompts_chat.jsonl"], max_steps=1,
                 reward_model_path=(tiny["reward"], tiny["tokenizer2_reward"]), reward_weights=(1.0, 0.5, 2.0))
    main(args)
    (first,) = _read_metrics(args.output_dir)
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["objective/non_score_reward"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/accuracies"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["objective/rlhf_reward"] == pytest.approx(first["objective/scores"], abs=1e-6)
    assert first["objective/scores_margin"] >= 0  # the chosen never scores below the rejected
    assert first["logps/chosen"] < 0 and first["objective/entropy"] > 0
    assert first["beta"] == 0.1 and first["step"] == 1


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_rpo_adds_alpha_times_the_chosen_completions_nll_per_token(tiny, tmp_path, monkeypatch, prefix_sharing):
    """--rpo_alpha 0.5, step 1 (the policy is still the model on disk): loss/nll is 0.5 x the mean over pairs of each
    chosen completion's negative log-likelihood per token, computed here by a separate forward of [prompt | chosen]
    alone with cross_entropy (float64); loss/dpo is the sigmoid loss (ln 2 at step 1) and loss their sum."""
    calls = []
    logprobs = online_dpo.completion_logprobs

    def recording(model, prompt_ids, prompt_mask, completion_ids, completion_mask, **kw):
        if torch.is_grad_enabled():  # the policy's call
            calls.append([t.clone() for t in (prompt_ids, prompt_mask, completion_ids, completion_mask)])
        return logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, **kw)

    monkeypatch.setattr(online_dpo, "completion_logprobs", recording)
    args = _args(tiny, tmp_path, max_steps=1, rpo_alpha=0.5, model_init_kwargs='{"dtype": "float64"}',
                 prefix_sharing=prefix_sharing)
    main(args)
    (first,) = [m for m in _read_metrics(args.output_dir) if "loss" in m]
    (prompt_ids, prompt_mask, completion_ids, completion_mask), = calls
    model = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float64)
    B = completion_ids.size(0) // 2
    nlls = []
    for i in range(B):  # the chosen completions are the first B rows
        prompt, chosen = prompt_ids[i][prompt_mask[i].bool()], completion_ids[i][completion_mask[i].bool()]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, chosen])[None]).logits[0]
        nlls.append(torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], chosen).item())
    assert first["loss/nll"] == pytest.approx(0.5 * sum(nlls) / B, rel=1e-9)
    assert first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-9)
    assert first["loss"] == pytest.approx(first["loss/dpo"] + first["loss/nll"], rel=1e-12)


def test_tr_dpo_under_bf16_keeps_and_mixes_a_float32_reference(tiny, tmp_path):
    """Frozen models are bf16 under --bf16, but TR-DPO's reference stays float32: the fp32 master weights mix into it
    without rounding to bf16 (checkpoint-1's reference/ is the mix, exactly, in float32)."""
    from safetensors.torch import load_file

    args = _args(tiny, tmp_path, bf16=True, sync_ref_model=True, ref_model_sync_steps=1, max_steps=2, save_steps=1,
                 reward_model_path=(tiny["reward"],))
    main(args)
    checkpoint = os.path.join(args.output_dir, "checkpoint-1")
    reference = load_file(os.path.join(checkpoint, "reference", "model.safetensors"))
    policy = load_file(os.path.join(checkpoint, "model.safetensors"))
    initial = load_file(os.path.join(tiny["policy"], "model.safetensors"))
    for k, v in reference.items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, 0.6 * policy[k] + (1 - 0.6) * initial[k]), k


def test_bf16_mixed_precision_keeps_fp32_master_weights(tiny, tmp_path):
    args = _args(tiny, tmp_path, bf16=True, max_steps=1, reward_model_path=(tiny["reward"],))
    main(args)
    (first,) = _read_metrics(args.output_dir)
    # The reference is held in bf16, the policy runs its matmuls in bf16 from fp32 weights: nearly, not exactly, equal.
    assert abs(first["objective/kl"]) < 0.05 and first["loss"] == pytest.approx(math.log(2), abs=5e-3)
    assert AutoModelForCausalLM.from_pretrained(args.output_dir).dtype == torch.float32


def test_stop_tokens_include_the_generation_configs_end_of_turn(tokenizer, policy):
    assert online_dpo.sampling_settings(online_dpo.Args(), tokenizer, policy).stop_ids == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")})


def test_beta_per_epoch_ipo_and_the_eos_penalty(tiny, tmp_path):
    # 32 prompts, 4 per micro-batch x 2 accumulation = 4 steps per epoch.
    args = _args(tiny, tmp_path, beta=(0.3, 0.05), loss_type="ipo", gradient_accumulation_steps=2, max_steps=10,
                 reward_funcs=("tests.rewards:zero",), missing_eos_penalty=1.5, warmup_steps=0.2, max_new_tokens=3)
    main(args)
    logs = _read_metrics(args.output_dir)
    assert [m["beta"] for m in logs] == [0.3] * 4 + [0.05] * 6
    assert [m["epoch"] for m in logs] == pytest.approx([s / 4 for s in range(1, 11)])
    # The rate each step used, as HF's Trainer logs it: warmup over 2 steps from 0, then linear to 0.
    assert [m["learning_rate"] for m in logs] == pytest.approx([1e-3 * f for f in (0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8)])
    for m in logs:  # the only score is the penalty, so scores = -penalty x (1 - fraction with an EOS)
        assert m["objective/scores"] == pytest.approx(-1.5 * (1 - m["val/contain_eos_token"]), abs=1e-6)
        assert m["completions/mean_length"] <= 3
    assert logs[0]["loss"] == pytest.approx((1 / (2 * 0.3)) ** 2, rel=1e-4)  # IPO at h = 0
    assert any(m["val/contain_eos_token"] < 1 for m in logs), "some completion must miss its EOS for this to mean anything"


def test_generation_kwargs_reach_the_sampler(tiny, tmp_path):
    # Greedy decoding would make both samples of a prompt the same completion: no pair to learn from, so refused.
    with pytest.raises(UsageError, match="do_sample must be true, got False: greedy decoding"):
        main(_args(tiny, tmp_path, generation_kwargs='{"do_sample": false}', max_steps=1))
    # Suppressing ids 0..99 removes every token the reward counts, and the EOS (id 1) with them.
    suppressed = _args(tiny, tmp_path, generation_kwargs=json.dumps({"suppress_tokens": list(range(100))}), max_steps=1)
    main(suppressed)
    (m,) = _read_metrics(suppressed.output_dir)
    assert m["objective/scores"] == 0.0 and m["val/contain_eos_token"] == 0.0


def test_saves_a_model_transformers_loads(tiny, tmp_path):
    args = _args(tiny, tmp_path, max_steps=4, save_steps=0.5)
    main(args)
    out = args.output_dir
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    trained = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(tiny["policy"])
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert changed, "training must change the weights"
    checkpoint = AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-2"))
    assert any(not torch.equal(p, trained.state_dict()[n]) for n, p in checkpoint.state_dict().items())
    with open(os.path.join(out, "online_dpo_args.json")) as f:
        assert json.load(f)["max_steps"] == 4
    assert not os.path.exists(out + ".tmp") and not os.path.exists(os.path.join(out, ".saving"))


@pytest.mark.parametrize("changes,message", [
    (dict(max_new_tokens=64, max_length=64), "--max_new_tokens \\(64\\) must be smaller than --max_length \\(64\\)"),
    (dict(loss_type="dpo"), "--loss_type must be sigmoid, ipo, hinge or robust, got 'dpo'"),
    (dict(label_smoothing=0.5), r"--label_smoothing must be in \[0, 0.5\), got 0.5"),
    (dict(loss_type="ipo", label_smoothing=0.1), "--label_smoothing with --loss_type ipo: only sigmoid"),
    (dict(loss_type="hinge", label_smoothing=0.1), "--label_smoothing with --loss_type hinge: only sigmoid"),
    (dict(rpo_alpha=-1.0), "--rpo_alpha must be >= 0, got -1.0"),
    (dict(ref_model_mixup_alpha=1.5), r"--ref_model_mixup_alpha must be in \(0, 1\] .*, got 1.5"),
    (dict(ref_model_sync_steps=0), "--ref_model_sync_steps must be >= 1, got 0"),
    (dict(sync_ref_model=True, use_peft=True), "--sync_ref_model with --use_peft: the reference, the policy with "
     "its adapters off, has no weights of its own to move"),
    (dict(beta=()), "--beta needs one or more values"),
    (dict(beta=(0.1, -1.0)), r"--beta must be > 0, got \(0.1, -1.0\)"),
    (dict(reward_weights=(1.0, 2.0)), "--reward_weights has 2 values but there are 1 rewards"),
    (dict(reward_funcs=(), reward_model_path=()), "no reward"),
    (dict(per_device_train_batch_size=0), "--per_device_train_batch_size must be >= 1"),
    (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps must be >= 1"),
    (dict(missing_eos_penalty=-1.0), "--missing_eos_penalty must be >= 0"),
    (dict(top_p=0.0), "--top_p must be in"),
    (dict(temperature=0.0), "--temperature must be >= 1e-4"),
    (dict(generation_kwargs='{"num_beams": 4}'), "unsupported keys \\['num_beams'\\]"),
    (dict(model_init_kwargs="{bad json"), "--model_init_kwargs must be a JSON object"),
    (dict(eval_prompts=-1), "--eval_prompts must be >= 0"),
    (dict(tie_threshold=-0.1), "--tie_threshold must be >= 0"),
    (dict(judge_undecided=0.5), r"--judge_undecided must be in \[0, 0.5\)"),
    (dict(judge_api_timeout=0.0), "--judge_api_timeout must be > 0"),
    (dict(judge_api_concurrency=0), "--judge_api_concurrency must be >= 1"),
    (dict(judge_api_retries=-1), "--judge_api_retries must be >= 0"),
])
def test_bad_arguments_fail_with_a_message_naming_them(tiny, tmp_path, changes, message):
    with pytest.raises(UsageError, match=message):
        check_args(Args(**vars(_args(tiny, tmp_path)) | changes))


def _without_chat_template(source, path, with_model=False):
    """A copy of a model directory (or of its tokenizer alone) whose tokenizer has no chat template."""
    from transformers import AutoTokenizer

    os.makedirs(path)
    if with_model:
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(source, name), path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    return str(path)


def test_inputs_that_need_a_look_fail_before_any_model_loads(tiny, tmp_path, monkeypatch):
    """Every input that can be checked without the models is, with a message naming the argument and the fix."""
    from transformers import AutoModelForSequenceClassification

    def no_loading(*a, **kw):
        raise AssertionError("a model was loaded before the input was checked")

    (tmp_path / "file").write_text("x")
    (tmp_path / "empty.jsonl").write_text("")
    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(tmp_path / "no_rows"))
    datasets.Dataset.from_dict({"prompt": ["a"]}).filter(lambda row: False).save_to_disk(str(tmp_path / "filtered"))
    two_labels = AutoModelForSequenceClassification.from_pretrained(tiny["reward"], num_labels=2, ignore_mismatched_sizes=True)
    two_labels.save_pretrained(tmp_path / "two_labels")
    shutil.copy(os.path.join(tiny["reward"], "tokenizer.json"), tmp_path / "two_labels")
    os.makedirs(tmp_path / "bare")
    shutil.copy(os.path.join(tiny["policy"], "config.json"), tmp_path / "bare")
    monkeypatch.setattr(online_dpo, "load_model", no_loading)
    chat = dict(dataset_name=tiny["prompts_chat.jsonl"])
    cases = [
        (dict(output_dir=str(tmp_path / "file")), "is a file"),
        (dict(output_dir=str(tmp_path / "file" / "out")), "--output_dir .* is not writable \\(Not a directory\\)"),
        (dict(reward_funcs=("tests.rewards:missing",)), "has no function 'missing'"),
        (dict(reward_funcs=("tests.nowhere:f",)), "cannot import .tests.nowhere."),
        (dict(reward_funcs=("tests.rewards:one_value",)), "one_value must return a list of 2 numbers"),
        (dict(reward_funcs=("tests.rewards:words",)), "words returned something that is not a number"),
        (dict(reward_funcs=("tests.rewards:raises",)), "raises fails on a trial call .*KeyError: 'solution'"),
        (dict(dataset_prompt_column="question"), "--dataset_prompt_column 'question'"),
        (dict(dataset_prompt_column="promt"), "did you mean 'prompt'"),
        (dict(dataset_name=str(tmp_path / "empty.jsonl")), "is an empty file"),
        (dict(dataset_name=str(tmp_path / "filtered")), "the 'train' split is empty"),
        (dict(dataset_name=str(tmp_path / "no_rows")), "could not read this saved dataset .*check that it holds prompts"),
        (dict(max_length=9, max_new_tokens=8), "all 32 prompts checked are longer than --max_length - --max_new_tokens = 1"),
        (dict(chat, model_name_or_path=_without_chat_template(tiny["policy"], tmp_path / "plain_policy_model",
                                                              with_model=True)),
         "tokenizer of .*plain_policy.*: conversational prompts need a tokenizer with a chat template"),
        (dict(chat, reward_model_path=(_without_chat_template(tiny["reward"], tmp_path / "plain_rm", with_model=True),)),
         "conversations: reward model .*plain_rm' has no chat template"),
        (dict(reward_model_path=(str(tmp_path / "two_labels"),)), "has a head with 2 outputs"),
        (dict(reward_model_path=(tiny["policy"],)), "is a Qwen2ForCausalLM, not a reward model"),
        (dict(reward_model_path=(_without_chat_template(tiny["policy"], tmp_path / "plain_policy"),)),
         "could not load model .*plain_policy"),  # a tokenizer and no config.json
        (dict(model_name_or_path=str(tmp_path / "bare")), "could not load the tokenizer of .*bare"),  # config.json alone
        (dict(per_device_train_batch_size=16, gradient_accumulation_steps=4), "the dataset has 32 prompts but one optimizer step needs"),
        (dict(push_to_hub=True), "--push_to_hub needs a Hub token"),
    ]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for changes, message in cases:
        with pytest.raises(UsageError, match=message):
            main(Args(**vars(_args(tiny, tmp_path)) | changes))
    for name, value in dict(WORLD_SIZE="8", RANK="0", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)  # the global batch counts every process, checked before any model loads
    monkeypatch.setattr(online_dpo, "init_distributed", lambda args: (0, 8, torch.device("cpu")))  # no other ranks
    with pytest.raises(UsageError, match=r"x processes = 4 x 2 x 8 = 64"):
        main(Args(**vars(_args(tiny, tmp_path)) | dict(gradient_accumulation_steps=2)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_output_dir_without_write_permission_is_refused(tiny, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(UsageError, match="is not writable \\(Permission denied\\)"):
        main(Args(**vars(_args(tiny, tmp_path)) | dict(output_dir=str(locked))))


def test_unreachable_hub_ids_are_named_and_point_to_the_tiny_preset(tiny, tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: these go through the real Hub loading code and fail as they would offline.
    with pytest.raises(UsageError, match="(?s)--dataset_name 'trl-lib/ultrafeedback-prompt': could not load it.*--preset tiny"):
        main(Args(**vars(_args(tiny, tmp_path)) | dict(dataset_name="trl-lib/ultrafeedback-prompt")))
    with pytest.raises(UsageError, match="(?s)'Qwen/Qwen2-0.5B-Instruct'.*Hub id you can reach or a local directory.*--preset tiny"):
        main(Args(**vars(_args(tiny, tmp_path)) | dict(model_name_or_path="Qwen/Qwen2-0.5B-Instruct")))
    with pytest.raises(UsageError, match="(?s)'trl-lib/Qwen2-0.5B-Reward'.*--preset tiny"):
        main(Args(**vars(_args(tiny, tmp_path)) | dict(reward_model_path=("trl-lib/Qwen2-0.5B-Reward",))))


def test_seed_commands_parse_as_written():
    quick = cli("--model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --reward_model_path trl-lib/Qwen2-0.5B-Reward "
                "--dataset_name trl-lib/ultrafeedback-prompt --learning_rate 5.0e-7 --output_dir Qwen2.5-0.5B-Online-DPO "
                "--warmup_steps 0.1 --push_to_hub".split())
    assert (quick.reward_model_path, quick.warmup_steps, quick.push_to_hub) == (("trl-lib/Qwen2-0.5B-Reward",), 0.1, True)
    pythia = cli("--model_name_or_path trl-lib/pythia-1b-deduped-tldr-sft --reward_model_path trl-lib/pythia-1b-deduped-tldr-rm "
                 "--dataset_name trl-lib/tldr --learning_rate 5.0e-7 --output_dir pythia-1b-deduped-tldr-online-dpo --beta 0.1 "
                 "--per_device_train_batch_size 8 --gradient_accumulation_steps 2 --num_train_epochs 3 --max_new_tokens 53 "
                 "--warmup_steps 0.1 --missing_eos_penalty 1.0 --save_steps 0.1 --push_to_hub".split())
    assert (pythia.beta, pythia.max_new_tokens, pythia.save_steps, pythia.missing_eos_penalty) == ((0.1,), 53, 0.1, 1.0)
    assert cli(["--gradient_checkpointing", "False", "--bf16"]).gradient_checkpointing is False
    assert cli(["--bf16"]).bf16 is True and cli([]).bf16 is None
    assert cli(["--beta", "0.1", "0.05"]).beta == (0.1, 0.05)
    defaults = cli([])
    assert (defaults.max_new_tokens, defaults.max_length, defaults.temperature, defaults.learning_rate) == (64, 256, 0.9, 5e-7)
    assert (defaults.logging_steps, defaults.gradient_checkpointing, defaults.loss_type) == (10, True, "sigmoid")


def _run(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "online_dpo.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=os.environ | (env or {}))


def test_help_documents_every_argument():
    out = _run("--help").stdout
    for name in Args.__dataclass_fields__:
        assert f"--{name}" in out, name
    assert "KL strength" in out and "(default: 5e-07)" in out


def test_a_typo_fails_fast_from_the_command_line(tiny):
    start = time.perf_counter()
    proc = _run("--model_name_or_path", "/nonexistent/model", "--max_new_tokens", "300")
    assert proc.returncode != 0 and time.perf_counter() - start < 60
    assert "--max_new_tokens (300) must be smaller than --max_length (256)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_run_learns_a_reward_and_saves_a_model_that_generates(tiny, tmp_path):
    out = str(tmp_path / "run")
    proc = _run("--model_name_or_path", tiny["policy"], "--dataset_name", tiny["prompts.jsonl"], "--reward_funcs",
                "tests/rewards.py:low_token_ids", "--max_new_tokens", "16", "--max_length", "64", "--learning_rate", "1e-2",
                "--lr_scheduler_type", "constant", "--max_steps", "30", "--logging_steps", "5", "--seed", "1",
                "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = _read_metrics(out)
    assert [m["step"] for m in logs] == [5, 10, 15, 20, 25, 30]
    assert sum(f"step {m['step']}/30 " in proc.stdout for m in logs) == 6  # one printed line per log step
    # A random-init policy scores ~0.25; each window averages 80 completions (std of the mean ~0.015).
    # Online DPO must lift it well beyond that noise.
    assert logs[-1]["objective/scores"] > logs[0]["objective/scores"] + 0.2, [m["objective/scores"] for m in logs]
    # (The implicit reward margin of fresh samples is not asserted: at this learning rate its last-window sign
    # depends on the CPU's float rounding; positive on one machine, -0.19 on another.)
    assert logs[-1]["objective/kl"] > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok(["the cat"], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt.input_ids.shape[1]:]
    # The trained policy now prefers the rewarded tokens under greedy decoding too.
    assert sum(t < 100 for t in generated.tolist()) / len(generated) > 0.5


def test_wandb_offline_run_records_the_metrics(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    data_dir = tmp_path / "data"  # a test split, for the policy/reference comparison
    data_dir.mkdir()
    for split in ("train", "test"):
        shutil.copy(tiny["prompts.jsonl"], data_dir / f"{split}.jsonl")
    main(_args(tiny, tmp_path, report_to="wandb", run_name="tiny-test", dataset_name=str(data_dir), eval_prompts=8,
               eval_steps=1))
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    files = os.listdir(tmp_path / "wandb" / runs[0])
    data = [f for f in files if f.endswith(".wandb")]
    assert data and os.path.getsize(tmp_path / "wandb" / runs[0] / data[0]) > 0
    # wandb's service process writes the run's files on its own: on a loaded machine it may lag behind finish().
    for _ in range(60):
        content = (tmp_path / "wandb" / runs[0] / data[0]).read_bytes()
        written = [f for _, _, fs in os.walk(tmp_path / "wandb" / runs[0]) for f in fs if f.endswith(".table.json")]
        if b"eval/win_rate" in content and len(written) >= 4:
            break
        time.sleep(0.5)
    assert b"objective/rlhf_reward" in content and b"rewards/accuracies" in content
    assert b"eval/win_rate" in content  # and the tables (each step's pairs and comparison), next to the run
    tables = {os.path.relpath(os.path.join(d, f), tmp_path / "wandb" / runs[0] / "files" / "media" / "table"): os.path.join(d, f)
              for d, _, fs in os.walk(tmp_path / "wandb" / runs[0]) for f in fs if f.endswith(".table.json")}
    assert sum(t.startswith("completions_") for t in tables) == 2 and sum(t.startswith("eval/completions_") for t in tables) == 2
    with open(next(path for t, path in tables.items() if t.startswith("completions_1_"))) as f:
        table = json.load(f)
    with open(tmp_path / "out" / "completions.jsonl") as f:
        logged = [list(r.values()) for r in map(json.loads, f) if r["step"] == 1]
    assert table["data"] == logged  # the same pairs in wandb and on disk


def test_push_to_hub_uploads_the_output_dir(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:  # records what would go to the Hub
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, ignore_patterns):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), ignore_patterns))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    args = _args(tiny, tmp_path, push_to_hub=True, hub_model_id="me/tiny-online-dpo")
    main(args)
    assert calls[0] == ("create", "me/tiny-online-dpo")
    _, repo, files, ignored = calls[1]
    assert repo == "me/tiny-online-dpo" and "model.safetensors" in files and "config.json" in files and ignored == ["checkpoint-*", "latest", ".lock"]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradient_checkpointing_recomputes_the_training_forward_only(tiny, tmp_path, monkeypatch, checkpointing):
    """With checkpointing each decoder layer's MLP runs twice with grad per micro-step (forward, then again in backward);
    without it once. Sampling runs without grad either way, so it keeps its KV cache."""
    calls = {"grad": 0, "no_grad": 0}
    load_model = online_dpo.load_model

    def spying_load_model(auto_class, path, args, **kw):
        model = load_model(auto_class, path, args, **kw)
        if calls.get("policy") is None:  # the first model loaded is the policy
            calls["policy"] = model
            model.model.layers[0].mlp.register_forward_pre_hook(  # inside the checkpointed forward
                lambda *_: calls.__setitem__("grad" if torch.is_grad_enabled() else "no_grad",
                                             calls["grad" if torch.is_grad_enabled() else "no_grad"] + 1))
        return model

    monkeypatch.setattr(online_dpo, "load_model", spying_load_model)
    main(_args(tiny, tmp_path, gradient_checkpointing=checkpointing, max_steps=1, gradient_accumulation_steps=2, eval_prompts=0))
    assert calls["grad"] == (4 if checkpointing else 2)  # 2 micro-steps
    assert calls["no_grad"] >= 2  # sampling: a prefill and decode steps per micro-step


def test_a_step_samples_once_and_each_micro_batch_trains_on_its_own_prompts(tiny, tmp_path, monkeypatch):
    """GA = 4 micro-batches of B = 2 prompts, K = 3 samples: sample() runs once per step, on all 8 prompts, and every
    prompt gets exactly K samples; micro-batch j trains on the pairs of the step's prompts 2j and 2j + 1 (their
    prompt and completion tokens, unpadded, are the step's). With --generation_batch_size 2 (= B: one pass per
    micro-batch, as before), sample() runs GA times a step, on each micro-batch's prompts."""
    calls, checked = [], []
    sample, micro_batch = online_dpo.sample, online_dpo.micro_batch

    def counting(model, prompt_ids, prompt_mask, how, num_samples=1, *rest, **kw):
        ids, mask = sample(model, prompt_ids, prompt_mask, how, num_samples, *rest, **kw)
        calls.append((prompt_ids.size(0), num_samples, ids.size(0)))
        return ids, mask

    def checking(samples, pairs, j, B):
        part, part_pairs = micro_batch(samples, pairs, j, B)
        N = len(samples.prompts)
        assert part.prompts == samples.prompts[j * B : (j + 1) * B]
        for i in range(B):
            p = j * B + i
            for step_row, row in ((pairs.chosen[p], part_pairs.chosen[i]), (pairs.rejected[p], part_pairs.rejected[i])):
                assert int(step_row) % N == p and int(row) % B == i  # a sample of this very prompt
                assert samples.token_ids[int(step_row)] == part.token_ids[int(row)]
                real = part.completion_mask[row].bool()
                assert part.completion_ids[row][real].tolist() == samples.token_ids[int(step_row)]
            assert torch.equal(part.prompt_ids[i][part.prompt_mask[i].bool()],
                               samples.prompt_ids[p][samples.prompt_mask[p].bool()])
        checked.append(j)
        return part, part_pairs

    monkeypatch.setattr(online_dpo, "sample", counting)
    monkeypatch.setattr(online_dpo, "micro_batch", checking)
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, num_samples=3, max_steps=2)
    main(_args(tiny, tmp_path, **common))
    assert calls == [(8, 3, 24)] * 2 and checked == [0, 1, 2, 3] * 2
    calls.clear()
    main(_args(tiny, tmp_path, **common, generation_batch_size=2, output_dir=str(tmp_path / "per_micro_batch")))
    assert calls == [(2, 3, 6)] * 8
