"""AI feedback (issue 8): LLM judges local and over HTTP, K samples per prompt, win-rate evaluation, completion logs."""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch

import online_dpo
from dpo_support.faults import TrainingError
from dpo_support.http_judge import ask as judge_over_http
from online_dpo import Args, judge_decisions, judge_locally, judge_texts, main
from tests import assets
from tests.judges import TEMPLATE, JudgeServer, low_count, make_rule_judge


def _args(tiny, out, **kw):
    base = dict(model_name_or_path=tiny["policy"], dataset_name=tiny["prompts.jsonl"], output_dir=str(out),
                reward_funcs=("tests.rewards:low_token_ids",), max_new_tokens=8, max_length=48,
                per_device_train_batch_size=4, max_steps=2, logging_steps=1, save_steps=0, learning_rate=1e-3,
                eval_prompts=0)
    return Args(**base | kw)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def rule_judge(tiny, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("judge") / "rule_judge")
    tokenizer = make_rule_judge(path, tiny["policy"])
    return path, tokenizer


def _local_choices(path, tokenizer, prompts, first, second, undecided=0.05):
    model = online_dpo.load_model(online_dpo.AutoModelForCausalLM, path, Args())
    texts = judge_texts(TEMPLATE, prompts, first, second)
    q, mass = judge_locally(model, tokenizer, texts, online_dpo.judge_answer_ids(tokenizer), batch_size=3)
    return judge_decisions(q, mass, undecided)


def test_local_judge_prefers_by_its_rule_in_both_orders_cancels_position_bias_and_drops_invalid(rule_judge):
    """Low-id tokens are what the rule judge likes. The judge has a +2 logit bias towards A, which both orders cancel."""
    path, tokenizer = rule_judge
    low = tokenizer.decode([t for t in range(3, 100) if low_count(tokenizer, tokenizer.decode([t])) == 1][:6])
    high = "the dog sits near the tree"  # words of the corpus: ids far above 100
    assert low_count(tokenizer, low) >= 4 and low_count(tokenizer, high) == 0
    prompts = ["a red bird", "a red bird", "a red bird", "the moon and the sun"]  # " moon": the judge's veto
    first, second = [low, high, high, low], [high, low, high, high]
    p, valid, decided = _local_choices(path, tokenizer, prompts, first, second)
    assert p[0] > 0.99 and p[1] < 0.01  # the same pair in the two orders: mirror images
    assert valid[:3].all() and decided[:2].all()
    assert p[2] == pytest.approx(0.5, abs=1e-6) and valid[2] and not decided[2]  # equal: the bias alone, cancelled
    assert not valid[3] and not decided[3]  # the mass went to another token: invalid, never a preference
    # Judged in one order only, the biased judge would prefer A when the two are equal.
    q, _ = judge_locally(online_dpo.load_model(online_dpo.AutoModelForCausalLM, path, Args()), tokenizer,
                         judge_texts(TEMPLATE, prompts[2:3], first[2:3], second[2:3])[:1],
                         online_dpo.judge_answer_ids(tokenizer), 1)
    assert q[0] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=1e-5)


def test_training_with_the_local_judge_trains_on_its_choices(tiny, tmp_path, rule_judge, monkeypatch):
    """Every pair logged: chosen by the judge (p_chosen >= 0.5), and in the loss exactly when the judge decided;
    the chosen completion has at least as many low tokens as the rejected one, as the judge reads them."""
    path, tokenizer = rule_judge
    seen = []
    decisions = online_dpo.judge_decisions

    def recording(q, mass, undecided):
        out = decisions(q, mass, undecided)
        seen.append(out)
        return out

    monkeypatch.setattr(online_dpo, "judge_decisions", recording)
    args = _args(tiny, tmp_path / "out", reward_funcs=(), judge_model_path=path, judge_prompt=TEMPLATE, max_steps=4,
                 eval_steps=1, max_new_tokens=6)
    main(args)
    logs = _lines(os.path.join(args.output_dir, "metrics.jsonl"))
    assert all(0 <= m["judge/invalid"] <= 1 and 0 <= m["judge/undecided"] <= 1 for m in logs)
    assert "objective/scores" not in logs[0] and "judge/api_failures" not in logs[0]
    pairs = _lines(os.path.join(args.output_dir, "completions.jsonl"))
    assert [r["step"] for r in pairs] == [s for s in range(1, 5) for _ in range(4)]
    decided = [bool(d) for _, _, dec in seen for d in dec]
    assert [r["in_loss"] for r in pairs] == decided  # GA 1: one judgement per step, of this micro-batch
    assert any(decided) and not all(decided)
    for r in pairs:
        assert r["p_chosen"] >= 0.5
        if r["in_loss"]:
            assert low_count(tokenizer, r["chosen"]) > low_count(tokenizer, r["rejected"])
    assert logs[-1]["judge/undecided"] + logs[-1]["judge/invalid"] == pytest.approx(1 - sum(decided[-4:]) / 4)


def test_http_judge_retries_drops_and_counts(tiny, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = JudgeServer(slow_s=1.5)
    try:
        names = ["plain", "slow", "flaky", "badjson", "garbled", "broken", "refused", "plain two"]
        prompts = [f"{n} request" for n in names]
        first = ["good good answer", "good", "good", "good", "good", "good", "good", "meh"]
        second = ["meh", "meh", "meh", "meh", "meh", "meh", "meh", "good"]
        args = Args(judge_api_base=server.url, judge_api_model="judge", judge_api_timeout=0.5, judge_api_retries=2,
                    judge_api_concurrency=4)
        q, mass, failed = judge_over_http(judge_texts(online_dpo.JUDGE_PROMPT, prompts, first, second), args)
        p, valid, decided = judge_decisions(q, mass, args.judge_undecided)
        by = dict(zip(names, range(8)))
        ok = [by[n] for n in ("plain", "slow", "flaky", "badjson", "plain two")]
        assert valid[ok].all() and decided[ok].all()
        assert p[ok].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # the response with more "good" wins, in both orders
        for n in ("garbled", "broken", "refused"):
            assert not valid[by[n]] and not decided[by[n]]
        # Failed requests: broken and refused, both orders each; garbled answered, just not A or B.
        assert failed.view(2, 8).T.tolist() == [[n in ("broken", "refused")] * 2 for n in names]
        tries = {prompt.split()[0]: n for (prompt, a, b), n in server.attempts.items() if a.startswith("good")}
        assert tries == {"plain": 1, "slow": 2, "flaky": 2, "badjson": 2, "garbled": 1, "broken": 3, "refused": 1}
        assert server.auth == "Bearer sk-test"
    finally:
        server.close()


def test_training_with_the_http_judge(tiny, tmp_path):
    """Wiring: a run whose preferences come from the server; every request answered, so nothing failed."""
    server = JudgeServer()
    try:
        args = _args(tiny, tmp_path / "out", reward_funcs=(), judge_api_base=server.url, judge_api_model="judge",
                     max_steps=2)
        main(args)
        logs = _lines(os.path.join(args.output_dir, "metrics.jsonl"))
        assert [m["judge/api_failures"] for m in logs] == [0.0, 0.0]
        assert sum(server.attempts.values()) == 2 * 4 * 2 + 1  # steps x prompts x orders, and the trial question
    finally:
        server.close()


def test_k_samples_train_on_the_best_and_the_worst_and_drop_ties(tiny, tmp_path, monkeypatch):
    """K = 4 completions of 2 tokens: low_token_ids takes 3 values, so many prompts tie. The policy trains on the
    completions of the best and the worst sample of each prompt; tied prompts stay out of the loss."""
    sampled, paired, trained, losses = [], [], [], []
    sample, pair, logprobs, loss = online_dpo.sample, online_dpo.pair, online_dpo.completion_logprobs, online_dpo.dpo_loss

    def record(store, fn):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            store.append((a, out))
            return out
        return wrapped

    monkeypatch.setattr(online_dpo, "sample", record(sampled, sample))
    monkeypatch.setattr(online_dpo, "pair", record(paired, pair))
    monkeypatch.setattr(online_dpo, "dpo_loss", record(losses, loss))
    monkeypatch.setattr(online_dpo, "completion_logprobs",
                        lambda model, *a, **kw: (trained.append(a[2]) if torch.is_grad_enabled() else None)
                        or logprobs(model, *a, **kw))
    args = _args(tiny, tmp_path / "out", num_samples=4, drop_ties=True, max_new_tokens=2, max_steps=3,
                 generation_kwargs='{"suppress_tokens": [1, 2, 3]}')  # no stop token: every completion has 2 tokens
    main(args)
    logs = _lines(os.path.join(args.output_dir, "metrics.jsonl"))
    B = 4
    for step in range(3):
        (_, (ids, _)), ((scores, K, _), (chosen, rejected, tie)) = sampled[step], paired[step]
        assert K == 4 and ids.shape[0] == 4 * B
        s = scores.view(4, B)
        assert torch.equal(scores[chosen], s.max(0).values) and torch.equal(scores[rejected], s.min(0).values)
        assert torch.equal(chosen % B, torch.arange(B)) and torch.equal(rejected % B, torch.arange(B))
        assert torch.equal(tie, s.max(0).values == s.min(0).values)
        assert torch.equal(trained[step], ids[torch.cat([chosen, rejected])])  # the pair's completions, nothing else
        assert logs[step]["pairs/ties"] == pytest.approx(tie.double().mean().item())
        step_losses = losses[step][1]
        if (~tie).any():
            assert logs[step]["loss"] == pytest.approx(step_losses[~tie].mean().item(), rel=1e-6)
        else:
            assert "loss" not in logs[step]  # no pair in the loss: no loss to log (and the step is skipped)
    assert any(p[1][2].any() for p in paired) and not all(p[1][2].all() for p in paired)


def test_tie_threshold_from_the_command_line_counts_near_ties(tiny, tmp_path, monkeypatch):
    """--tie_threshold 0.5 with 2-token completions: low_token_ids scores 0, 0.5 or 1, so best and worst tie unless
    they differ by 1; tied prompts stay out of the loss with --drop_ties."""
    paired, pair = [], online_dpo.pair

    def recording(*a):
        paired.append((a, pair(*a)))
        return paired[-1][1]

    monkeypatch.setattr(online_dpo, "pair", recording)
    argv = ["--model_name_or_path", tiny["policy"], "--dataset_name", tiny["prompts.jsonl"], "--output_dir",
            str(tmp_path / "out"), "--reward_funcs", "tests.rewards:low_token_ids", "--max_new_tokens", "2",
            "--max_length", "48", "--per_device_train_batch_size", "4", "--max_steps", "3", "--logging_steps", "1",
            "--save_steps", "0", "--eval_prompts", "0", "--num_samples", "4", "--drop_ties", "--tie_threshold", "0.5",
            "--generation_kwargs", '{"suppress_tokens": [1, 2, 3]}']
    assert online_dpo.run(argv) == 0
    logs = _lines(str(tmp_path / "out" / "metrics.jsonl"))
    for ((scores, K, threshold), (chosen, rejected, tie)), log in zip(paired, logs):
        assert threshold == 0.5
        spread = scores.view(K, -1).max(0).values - scores.view(K, -1).min(0).values
        assert torch.equal(tie, spread <= 0.5)
        assert log["pairs/ties"] == pytest.approx(tie.double().mean().item())
    assert len(paired) == 3 and any(o[2].any() for _, o in paired)


def test_judge_undecided_from_the_flag(tiny, tmp_path, rule_judge, monkeypatch):
    """--judge_undecided 0.45: only judgements beyond 0.95 (or below 0.05) are decided, and only they train."""
    path, _ = rule_judge
    seen, decisions = [], online_dpo.judge_decisions

    def recording(q, mass, undecided):
        seen.append((undecided, decisions(q, mass, undecided)))
        return seen[-1][1]

    monkeypatch.setattr(online_dpo, "judge_decisions", recording)
    args = _args(tiny, tmp_path / "out", reward_funcs=(), judge_model_path=path, judge_prompt=TEMPLATE, max_steps=2,
                 eval_steps=1, max_new_tokens=6, judge_undecided=0.45)
    main(args)
    pairs = _lines(os.path.join(args.output_dir, "completions.jsonl"))
    assert [u for u, _ in seen] == [0.45, 0.45]
    for (_, (p, valid, decided)), step in zip(seen, (1, 2)):
        assert torch.equal(decided, valid & ((p - 0.5).abs() > 0.45))
        assert [r["in_loss"] for r in pairs if r["step"] == step] == decided.tolist()


def test_every_pair_tied_trains_nothing_and_saves_nothing(tiny, tmp_path):
    """Every step skipped (no pair carried a preference): the run says so, and the input weights are not saved as
    trained ones."""
    args = _args(tiny, tmp_path / "out", reward_funcs=("tests.rewards:zero",), drop_ties=True, max_steps=2)
    with pytest.raises(TrainingError, match="every one of the 2 steps was skipped .*2 with no preference"):
        main(args)
    assert not os.path.exists(os.path.join(args.output_dir, "model.safetensors"))
    logs = _lines(os.path.join(args.output_dir, "metrics.jsonl"))
    assert [m["pairs/ties"] for m in logs] == [1.0, 1.0] and [m["empty_steps"] for m in logs] == [1, 2]


def test_completions_file_holds_what_was_trained_on(tiny, tmp_path, tokenizer, monkeypatch):
    """A reward on the text (fraction of 'e' letters): the logged scores are that reward of the logged texts, and the
    logged texts are the decoded completions the policy was trained on."""
    trained, logprobs = [], online_dpo.completion_logprobs
    monkeypatch.setattr(online_dpo, "completion_logprobs",
                        lambda model, *a, **kw: (trained.append(a[2:4]) if torch.is_grad_enabled() else None)
                        or logprobs(model, *a, **kw))
    args = _args(tiny, tmp_path / "out", reward_funcs=("tests.rewards:letter_e",), eval_steps=2, max_steps=4)
    main(args)
    pairs = _lines(os.path.join(args.output_dir, "completions.jsonl"))
    assert [r["step"] for r in pairs] == [2] * 4 + [4] * 4
    from tests.rewards import letter_e
    for r in pairs:
        assert letter_e(None, [r["chosen"], r["rejected"]]) == pytest.approx([r["score_chosen"], r["score_rejected"]])
        assert r["score_chosen"] >= r["score_rejected"]
    for step, rows in ((2, pairs[:4]), (4, pairs[4:])):
        ids, mask = trained[step - 1]
        texts = tokenizer.batch_decode([i[m.bool()].tolist() for i, m in zip(ids, mask)], skip_special_tokens=True)
        assert [r["chosen"] for r in rows] == texts[:4] and [r["rejected"] for r in rows] == texts[4:]


@pytest.fixture(scope="module")
def held_out(tiny, tmp_path_factory):
    """128 train and 64 test prompts of the tiny test world."""
    root = tmp_path_factory.mktemp("held_out")
    assets.write_prompts(str(root / "train.jsonl"), n=128, seed=5)
    assets.write_prompts(str(root / "test.jsonl"), n=64, seed=6)
    return str(root)


def test_win_rate_is_a_half_for_the_reference_itself_and_rises_with_training(tiny, tmp_path, held_out):
    """Policy and reference answer from independent random streams, so a policy equal to the reference (learning rate
    0) wins about half the time: 0.5 within 4 standard errors of 64 prompts. Trained on the same learnable reward,
    the win rate rises above it at every evaluation, and the logged rewards agree with it."""
    common = dict(dataset_name=held_out, eval_prompts=64, per_device_train_batch_size=8, max_new_tokens=12,
                  eval_steps=10, max_steps=20, logging_steps=10)
    still = _args(tiny, tmp_path / "still", learning_rate=0.0, **common)
    main(still)
    evals = [m for m in _lines(os.path.join(still.output_dir, "metrics.jsonl")) if "eval/win_rate" in m]
    assert [m["step"] for m in evals] == [10, 20]
    for m in evals:
        assert m["eval/win_rate"] == pytest.approx(0.5, abs=4 * 0.5 / 8) and m["eval/judged"] == 1.0
    trained = replace(still, output_dir=str(tmp_path / "trained"), learning_rate=1e-2)
    main(trained)
    evals = [m for m in _lines(os.path.join(trained.output_dir, "metrics.jsonl")) if "eval/win_rate" in m]
    assert all(m["eval/win_rate"] > 0.65 for m in evals)  # 0.76 and 0.90 when written
    assert evals[-1]["eval/win_rate"] >= evals[0]["eval/win_rate"] - 0.05
    assert evals[-1]["eval/reward_trained"] > evals[-1]["eval/reward_reference"] + 0.1


def test_judge_flags_are_checked_before_loading(tiny, tmp_path, monkeypatch):
    def no_loading(*a, **kw):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(online_dpo, "load_model", no_loading)
    judge = dict(reward_funcs=(), judge_model_path=tiny["policy"])
    cases = [
        (dict(judge_model_path=tiny["policy"]), "a judge and rewards both given"),
        (dict(judge, num_samples=4), "--num_samples must be 2 with it"),
        (dict(judge, judge_api_base="http://x/v1", judge_api_model="m"), "give one judge"),
        (dict(reward_funcs=(), judge_api_base="http://x/v1"), "--judge_api_base needs --judge_api_model"),
        (dict(judge, missing_eos_penalty=1.0), "--missing_eos_penalty lowers reward scores"),
        (dict(judge, judge_prompt="Compare {prompt} and {response_a}"), "must contain \\{prompt\\}, \\{response_a\\}"),
        (dict(judge, judge_prompt="{prompt} {response_a} {response_b} {score}"), "no other braces"),
        (dict(num_samples=1), "--num_samples must be >= 2"),
        (dict(reward_funcs=(), judge_model_path=str(tmp_path / "nowhere")), "could not load the tokenizer"),
    ]
    for changes, message in cases:
        with pytest.raises(online_dpo.UsageError, match=message):
            main(replace(_args(tiny, tmp_path / "out"), **changes))
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_local_judge_on_a_real_model_equals_each_question_asked_alone(tiny, tokenizer):
    """A Qwen2 judge (random weights, chat template), questions of different lengths batched with left padding: q and
    mass equal the next-token softmax of each question run alone, unpadded (float64 model; float32 softmax)."""
    model = online_dpo.load_model(online_dpo.AutoModelForCausalLM, tiny["policy"], Args(), dtype=torch.float64).eval()
    prompts = ["a cat", "the old dog runs near the river and the big tree", "sun"]
    texts = judge_texts(online_dpo.JUDGE_PROMPT, prompts, ["red bird sings", "a", "green light"], ["b", "moon", "dark"])
    ids = online_dpo.judge_answer_ids(tokenizer)
    q, mass = judge_locally(model, tokenizer, texts, ids, batch_size=4)
    for i, text in enumerate(texts):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        row = torch.tensor([tokenizer.encode(chat, add_special_tokens=False)])
        with torch.no_grad():
            p = model(row).logits[0, -1].softmax(-1)[ids]
        assert mass[i].item() == pytest.approx(p.sum().item(), rel=1e-5)  # the judge reads float32 probabilities
        assert q[i].item() == pytest.approx((p[0] / p.sum()).item(), rel=1e-5)  # the judge reads float32 probabilities
    assert len({len(tokenizer.encode(t)) for t in texts}) > 1  # the padding was real


def test_evaluations_leave_the_training_run_as_it_was(tiny, tmp_path, held_out):
    """A reward that draws from Python's and NumPy's random streams: with or without comparisons every 2 steps, the
    training lines of metrics.jsonl and the final weights are the same (evaluation restores the streams it used)."""
    from safetensors.torch import load_file

    common = dict(dataset_name=held_out, eval_prompts=8, reward_funcs=("tests.rewards:noisy_low_token_ids",), max_steps=4)
    runs = {}
    for name, every in (("plain", 0), ("evaluated", 2)):
        args = _args(tiny, tmp_path / name, eval_steps=every, **common)
        main(args)
        lines = _lines(os.path.join(args.output_dir, "metrics.jsonl"))
        runs[name] = ([{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines if "loss" in m],
                      load_file(os.path.join(args.output_dir, "model.safetensors")), lines)
    assert [m["step"] for m in runs["evaluated"][2] if "eval/win_rate" in m] == [2, 4]
    assert runs["plain"][0] == runs["evaluated"][0] and len(runs["plain"][0]) == 4
    assert all(torch.equal(runs["plain"][1][k], runs["evaluated"][1][k]) for k in runs["plain"][1])
