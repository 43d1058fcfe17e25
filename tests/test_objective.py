"""Pairing, loss, metrics and the learning-rate schedule against formulas written out here."""

import math
import types

import pytest
import torch

import online_dpo
from online_dpo import dpo_loss, pair, step_metrics, steps_of


def test_pair_keeps_both_completions_of_a_prompt_and_gives_ties_to_the_first():
    scores = torch.tensor([0.5, 2.0, 1.0, -3.0, 0.7, 1.0, 1.0, -3.0])  # B = 4: prompt i has samples i and i + 4
    chosen, rejected, tie = pair(scores)
    assert tie.tolist() == [False, False, True, True]
    assert chosen.tolist() == [4, 1, 2, 3]  # 0.7 > 0.5; 2.0 > 1.0; tie 1.0 = 1.0 -> first; tie -> first
    assert rejected.tolist() == [0, 5, 6, 7]
    assert torch.equal(chosen % 4, rejected % 4) and torch.equal(chosen % 4, torch.arange(4))
    assert (scores[chosen] >= scores[rejected]).all()


@pytest.mark.parametrize("K", [3, 4])
def test_pair_of_k_samples_is_the_best_and_the_worst_of_each_prompt(K):
    """K = 4 x B = 50 rounded scores (many ties): chosen is a highest, rejected a lowest score of the same prompt,
    the earliest of the highest and the latest of the lowest; NaN ranks last; tie when they differ by <= 0.5."""
    B = 50
    g = torch.Generator().manual_seed(K)
    scores = torch.randint(0, 2, (K * B,), generator=g).double() * 2
    scores[torch.rand(K * B, generator=g) < 0.1] = math.nan
    chosen, rejected, tie = pair(scores, K, tie_threshold=0.5)
    for i in range(B):
        samples = [scores[k * B + i].item() for k in range(K)]
        ranked = [-math.inf if math.isnan(x) else x for x in samples]
        best = max(range(K), key=lambda k: (ranked[k], -k))
        worst = min(range(K), key=lambda k: (ranked[k], -k))
        assert (chosen[i].item(), rejected[i].item()) == (best * B + i, worst * B + i)
        assert tie[i].item() == (ranked[best] - ranked[worst] <= 0.5)
    assert tie.any() and not tie.all()


def test_pair_on_random_scores():
    scores = torch.randn(64, generator=torch.Generator().manual_seed(0))
    chosen, rejected, _ = pair(scores)
    for i in range(32):
        best, worst = (i, i + 32) if scores[i] >= scores[i + 32] else (i + 32, i)
        assert (chosen[i].item(), rejected[i].item()) == (best, worst)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_and_ipo_losses(beta):
    g = torch.Generator().manual_seed(1)
    c, r, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    sigmoid = dpo_loss(c, r, rc, rr, beta, "sigmoid")
    ipo = dpo_loss(c, r, rc, rr, beta, "ipo")
    for i in range(8):
        h = (c[i].item() - r[i].item()) - (rc[i].item() - rr[i].item())
        assert sigmoid[i].item() == pytest.approx(math.log(1 + math.exp(-beta * h)), rel=1e-12)
        assert ipo[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
    assert dpo_loss(c, r, c, r, beta, "sigmoid").allclose(torch.full((8,), math.log(2), dtype=torch.float64))


def _softplus(x):  # log(1 + e^x) in float64, written out
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _logistic(x):
    return 1 / (1 + math.exp(-x))


# Each loss of h (the policy's margin over the reference's) and its derivative d loss / d h, written out from the
# papers: hinge (SLiC; RSO eq. 12), cDPO (Mitchell 2023, the label right with probability 1 - e), robust (Chowdhury
# et al. 2024, rDPO), all with beta b and the flip rate e.
LOSSES = {
    "hinge": (lambda h, b, e: max(0.0, 1 - b * h), lambda h, b, e: -b if b * h < 1 else 0.0),
    "sigmoid": (lambda h, b, e: (1 - e) * _softplus(-b * h) + e * _softplus(b * h),
                lambda h, b, e: -b * (1 - e) * _logistic(-b * h) + b * e * _logistic(b * h)),
    "robust": (lambda h, b, e: ((1 - e) * _softplus(-b * h) - e * _softplus(b * h)) / (1 - 2 * e),
               lambda h, b, e: (-b * (1 - e) * _logistic(-b * h) - b * e * _logistic(b * h)) / (1 - 2 * e)),
}


@pytest.mark.parametrize("loss_type", list(LOSSES))
@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3)])
def test_hinge_cdpo_and_robust_losses_and_their_gradients(loss_type, beta, eps):
    """Values and gradients (with respect to all four log-probs) against the formulas above, float64."""
    if loss_type == "hinge":
        eps = 0.0  # no label smoothing with hinge (refused)
    g = torch.Generator().manual_seed(3)
    c, r, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64).mul(8).requires_grad_() for _ in range(4))
    losses = dpo_loss(c, r, rc, rr, beta, loss_type, eps)
    grads = torch.autograd.grad(losses.sum(), [c, r, rc, rr])
    value, slope = LOSSES[loss_type]
    for i in range(16):
        h = (c[i].item() - r[i].item()) - (rc[i].item() - rr[i].item())
        assert losses[i].item() == pytest.approx(value(h, beta, eps), rel=1e-12, abs=1e-14)
        d = slope(h, beta, eps)  # dh/dc = 1, dh/dr = -1, dh/drc = -1, dh/drr = 1
        for grad, sign in zip(grads, (1, -1, -1, 1)):
            assert grad[i].item() == pytest.approx(sign * d, rel=1e-12, abs=1e-14)


def test_label_smoothing_0_is_the_sigmoid_loss_bit_for_bit_and_robust_is_unbiased_under_flipped_labels():
    g = torch.Generator().manual_seed(4)
    c, r, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 4 for _ in range(4))
    plain = torch.nn.functional.softplus(-0.1 * ((c - r) - (rc - rr)))  # -log sigmoid(beta h)
    for kind in ("sigmoid", "robust"):
        torch.testing.assert_close(dpo_loss(c, r, rc, rr, 0.1, kind, 0.0), plain, rtol=1e-15, atol=0)
    assert torch.equal(dpo_loss(c, r, rc, rr, 0.1, "sigmoid", 0.0), dpo_loss(c, r, rc, rr, 0.1, "sigmoid"))
    # A toy distribution of labels: each pair's true preference is (c, r); the annotator flips it with probability
    # e, which swaps chosen and rejected (h -> -h). Averaged over that flip, robust's loss is the clean sigmoid loss
    # (its defining property); cDPO's and the plain sigmoid's are not.
    for eps in (0.05, 0.2, 0.45):
        robust = (1 - eps) * dpo_loss(c, r, rc, rr, 0.1, "robust", eps) + eps * dpo_loss(r, c, rr, rc, 0.1, "robust", eps)
        torch.testing.assert_close(robust, plain, rtol=1e-12, atol=1e-14)
        sigmoid = (1 - eps) * dpo_loss(c, r, rc, rr, 0.1, "sigmoid") + eps * dpo_loss(r, c, rr, rc, 0.1, "sigmoid")
        assert (sigmoid - plain).abs().max() > 1e-3
    # And by sampling: 20000 flips drawn at random, the mean of robust's loss tends to the clean loss.
    flips = torch.rand(20000, 64, generator=g, dtype=torch.float64) < 0.2
    h = (c - r) - (rc - rr)
    noisy = torch.where(flips, -h, h)  # what the annotator's labels make of h
    draws = dpo_loss(noisy, torch.zeros_like(noisy), torch.zeros_like(noisy), torch.zeros_like(noisy), 0.1, "robust",
                     0.2)  # (20000, 64)
    standard_error = draws.std(0) / math.sqrt(draws.size(0))
    assert ((draws.mean(0) - plain).abs() < 5 * standard_error).all()


def test_reference_mixing_is_alpha_policy_plus_1_minus_alpha_reference():
    """TR-DPO's soft update on two models of one shape: every weight (the tied embedding once) becomes
    alpha * policy + (1 - alpha) * old, exactly as written here in the same dtype, and within float32 rounding of
    the float64 mix."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    policy, ref = Qwen2ForCausalLM(config), Qwen2ForCausalLM(config)
    old = {k: v.clone() for k, v in ref.state_dict().items()}
    online_dpo.mix_reference(ref, policy, 0.6)
    new, pol = ref.state_dict(), policy.state_dict()
    for k in old:
        assert torch.equal(new[k], 0.6 * pol[k] + (1 - 0.6) * old[k]), k
        exact = 0.6 * pol[k].double() + 0.4 * old[k].double()
        torch.testing.assert_close(new[k].double(), exact, rtol=1e-6, atol=1e-7)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # still tied
    assert any(not torch.equal(new[k], old[k]) for k in old)


def test_every_metric_against_the_formulas():
    """K = 3 samples of B = 3 prompts; a reward abstains (NaN) on two samples; one pair is left out of the loss.
    KL, entropy and the RLHF reward are over the pairs' completions; scores, EOS and lengths over all K x B samples,
    the scores over those a reward scored; rewards/* and logps/* over the pairs kept in the loss."""
    g = torch.Generator().manual_seed(2)
    B, K, T, beta = 3, 3, 5, 0.2
    scores = torch.randn(K * B, generator=g, dtype=torch.float64)
    scores[[1, 5]] = math.nan  # prompt 1's first sample, prompt 2's second: no reward scored them
    chosen, rejected, _ = pair(scores, K)
    kept = torch.tensor([True, False, True])
    all_mask = torch.ones(K * B, T, dtype=torch.long)
    for row, length in ((0, 3), (4, 1), (7, 2), (8, 4)):
        all_mask[row, length:] = 0
    all_eos = torch.tensor([True, False, True, True, False, False, True, True, False])
    pick = torch.cat([chosen, rejected])  # the pairs' rows among the K x B samples: chosen, then rejected
    mask = all_mask[pick]
    logps = -torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 3
    ref_logps = -torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 3
    logps[mask == 0], ref_logps[mask == 0] = -99.0, -7.0  # padding must not count
    losses = torch.rand(B, generator=g, dtype=torch.float64)
    pairs = types.SimpleNamespace(chosen=chosen, rejected=rejected, kept=kept, scores=scores)
    samples = types.SimpleNamespace(has_eos=all_eos, completion_mask=all_mask)
    got = {k: v.double().mean().item()
           for k, v in step_metrics(logps, ref_logps, mask, pairs, samples, losses[kept], beta).items()}

    # Written out per completion, with python loops over the real tokens only.
    lp = [sum(logps[i, t].item() for t in range(T) if mask[i, t]) for i in range(2 * B)]
    rp = [sum(ref_logps[i, t].item() for t in range(T) if mask[i, t]) for i in range(2 * B)]
    s = scores.tolist()
    p = pick.tolist()
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    c = [i for i in range(B) if kept[i]]  # the kept pairs' chosen rows among the 2B; their rejected: + B
    rc = [beta * (lp[i] - rp[i]) for i in c]
    rr = [beta * (lp[i + B] - rp[i + B]) for i in c]
    expected = {
        "loss": mean([losses[i].item() for i in c]),
        "objective/kl": mean([lp[i] - rp[i] for i in range(2 * B)]),
        "objective/entropy": mean([-x for x in lp]),
        "objective/non_score_reward": mean([-beta * (lp[i] - rp[i]) for i in range(2 * B)]),
        "objective/rlhf_reward": mean([s[p[i]] - beta * (lp[i] - rp[i]) for i in range(2 * B) if s[p[i]] == s[p[i]]]),
        "objective/scores": mean([x for x in s if x == x]),
        "objective/scores_margin": mean([s[a] - s[b] for a, b in zip(chosen.tolist(), rejected.tolist())
                                         if s[a] == s[a] and s[b] == s[b]]),
        "objective/scored": 7 / 9,
        "rewards/chosen": mean(rc),
        "rewards/rejected": mean(rr),
        "rewards/margins": mean([a - b for a, b in zip(rc, rr)]),
        "rewards/accuracies": mean([float(a > b) for a, b in zip(rc, rr)]),
        "logps/chosen": mean([lp[i] for i in c]),
        "logps/rejected": mean([lp[i + B] for i in c]),
        "val/contain_eos_token": 5 / 9,
        "completions/mean_length": mean([3, 5, 5, 5, 1, 5, 5, 2, 4]),
        "beta": beta,
    }
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert any(math.isnan(s[p[i]]) for i in range(2 * B)), "an unscored completion must be in a pair"


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedule_warms_up_then_decays(kind):
    """The learning rate of every step: linear warmup from 0, then linear to 0, half a cosine to 0, or constant."""
    total, warmup, peak = 50, 7, 0.3
    policy = torch.nn.Linear(2, 2)
    args = online_dpo.Args(learning_rate=peak, lr_scheduler_type=kind)
    optimizer, scheduler = online_dpo.make_optimizer(policy, args, online_dpo.Plan(50, total, warmup, 1, 0, 0))
    for step in range(total):
        decayed = (step - warmup) / (total - warmup)
        expected = step / warmup if step < warmup else {"linear": 1 - decayed, "constant": 1.0,
                                                        "cosine": 0.5 * (1 + math.cos(math.pi * decayed))}[kind]
        assert optimizer.param_groups[0]["lr"] == pytest.approx(peak * expected, rel=1e-12, abs=1e-15), step
        optimizer.step()
        scheduler.step()


def test_fractions_of_all_steps():
    assert steps_of(0.1, 95) == 10  # as TrainingArguments: ceil(0.1 * 95)
    assert steps_of(3, 95) == 3
    assert steps_of(0, 95) == 0


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_completion_logprobs_match_each_row_run_alone(tiny, impl):
    """Left-padded prompts, right-padded completions, one batch: each real completion token's log-prob equals the
    one from running that row alone without any padding (float64); padding positions are 0. The fused path's
    parameter gradients equal the naive path's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["policy"], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g) for n in (3, 7, 5)]
    completions = [torch.randint(5, 300, (n,), generator=g) for n in (4, 1, 6)]
    P, T = max(map(len, prompts)), max(map(len, completions))
    prompt_ids, prompt_mask = torch.zeros(3, P, dtype=torch.long), torch.zeros(3, P, dtype=torch.long)
    completion_ids, completion_mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = p, 1
        completion_ids[i, : len(c)], completion_mask[i, : len(c)] = c, 1
    logps = online_dpo.completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, impl)
    assert logps.dtype == torch.float64 and logps.shape == (3, T)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            alone = model(input_ids=torch.cat([p, c])[None]).logits[0].log_softmax(-1)
        expected = alone[len(p) - 1 : len(p) - 1 + len(c)].gather(1, c[:, None]).squeeze(1)
        torch.testing.assert_close(logps[i, : len(c)].detach(), expected, atol=1e-10, rtol=0)
        assert (logps[i, len(c):] == 0).all()
    weights = (torch.arange(3 * T, dtype=torch.float64).view(3, T) % 5) - 2  # sign-changing upstream gradient
    grads = torch.autograd.grad((logps * weights).sum(), list(model.parameters()))
    other = online_dpo.completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                           "naive" if impl == "fused" else "fused")
    for a, b in zip(grads, torch.autograd.grad((other * weights).sum(), list(model.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
