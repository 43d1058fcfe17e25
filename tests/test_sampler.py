"""The KV-cache sampler against transformers' own generate() and the sampling filters written out."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from online_dpo import Sampling, draw, encode_prompts, filter_logits, sample
from tests import assets

PROMPTS = ["the cat", "a big old dog sits near the river and sings", "sun", "red stone house under a blue moon"]


@pytest.fixture(scope="module")
def llama_policy(tiny, tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    assets.make_causal_lm(path, tokenizer, "llama", seed=3)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _generate(model, ids, mask, max_new_tokens, eos, pad, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad, **kw)
    return out[:, ids.size(1):]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_matches_generate_on_left_padded_prompts(arch, policy, llama_policy, tokenizer):
    model = policy if arch == "qwen2" else llama_policy
    ids, mask = encode_prompts(tokenizer, PROMPTS, 64)
    assert (mask == 0).any(), "the prompts must need left padding for this test to mean anything"
    pad = tokenizer.pad_token_id
    free, free_mask = sample(model, ids, mask, Sampling(20, stop_ids=[pad], pad_id=pad, do_sample=False))  # nothing stops early
    reference = _generate(model, ids, mask, 20, eos=[], pad=pad)
    assert torch.equal(free, reference)
    assert free_mask.all()

    # A stop token that greedy decoding produces mid-way in some rows: rows end there, the batch ends when all have.
    stop = int(reference[0, 5])
    ours, ours_mask = sample(model, ids, mask, Sampling(20, stop_ids=[stop], pad_id=pad, do_sample=False))
    theirs = _generate(model, ids, mask, 20, eos=[stop], pad=pad)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    for row, row_mask in zip(ours.tolist(), ours_mask.tolist()):
        end = row.index(stop) + 1 if stop in row else len(row)
        assert row_mask == [1] * end + [0] * (len(row) - end)  # the stop token itself is kept
        assert row[end:] == [pad] * (len(row) - end)


def test_greedy_with_repetition_penalty_matches_generate(policy, tokenizer):
    # Equal-length prompts: transformers also counts padding as "seen", we do not.
    ids = torch.randint(10, len(tokenizer), (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    pad = tokenizer.pad_token_id
    ours, _ = sample(policy, ids, mask, Sampling(24, stop_ids=[pad], pad_id=pad, do_sample=False, repetition_penalty=1.8))
    theirs = _generate(policy, ids, mask, 24, eos=[], pad=pad, repetition_penalty=1.8)
    plain = _generate(policy, ids, mask, 24, eos=[], pad=pad)
    assert torch.equal(ours, theirs)
    assert not torch.equal(theirs, plain), "the penalty must change the output for this test to mean anything"


def _reference_filter(logits, top_k, top_p, min_p):
    """Which tokens each filter keeps, written out in float64 row by row: the top_k largest; the smallest set of the
    likeliest whose mass reaches top_p; those at least min_p times as likely as the likeliest."""
    keep = torch.ones(logits.shape, dtype=torch.bool)
    for row, scores in enumerate(logits.double()):
        order = sorted(range(len(scores)), key=lambda i: -scores[i].item())
        if top_k:
            keep[row, order[top_k:]] = False
        if top_p < 1:
            probs = torch.where(keep[row], scores, -math.inf).softmax(-1)
            mass = 0.0
            for n, i in enumerate(order):
                mass += probs[i].item()
                if mass >= top_p:
                    keep[row, order[n + 1:]] = False
                    break
        if min_p:
            probs = torch.where(keep[row], scores, -math.inf).softmax(-1)
            keep[row] &= probs >= min_p * probs.max()
    return keep


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, None), (0, 0.6, None), (0, 1.0, 0.3), (20, 0.9, 0.05), (1, 0.1, 0.5)])
def test_filter_logits_keeps_the_tokens_each_filter_should(top_k, top_p, min_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=g, dtype=torch.float64) * 3
    kept = torch.isfinite(filter_logits(logits, top_k, top_p, min_p))
    assert torch.equal(kept, _reference_filter(logits, top_k, top_p, min_p))
    assert kept.sum(-1).min() >= 1


@pytest.mark.parametrize("top_k,top_p,min_p", [(4, 1.0, None), (0, 0.3, None), (0, 1.0, 0.8)])
def test_sampled_tokens_respect_the_filters(policy, tokenizer, top_k, top_p, min_p):
    """Recompute every step's logits with a plain forward (no cache) and check each sampled token was allowed."""
    torch.manual_seed(0)
    with torch.no_grad():  # sharpen the random model so that the filters cut something
        policy_sharp = type(policy)(policy.config).eval()
        policy_sharp.load_state_dict(policy.state_dict())
        policy_sharp.lm_head.weight.mul_(4.0)
    ids, mask = encode_prompts(tokenizer, PROMPTS * 4, 64)
    temperature = 0.5  # < 1: filtering before the temperature would let through tokens it must cut
    gen = torch.Generator().manual_seed(3)
    pad = tokenizer.pad_token_id
    how = Sampling(16, stop_ids=[pad], pad_id=pad, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    out, out_mask = sample(policy_sharp, ids, mask, how, generator=gen)
    full = torch.cat([ids, out], 1)
    full_mask = torch.cat([mask, out_mask], 1)
    with torch.no_grad():
        logits = policy_sharp(input_ids=full, attention_mask=full_mask,
                              position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits.double()
    P = ids.size(1)
    step_logits = logits[:, P - 1 : -1] / temperature  # (N, T, V): the distribution each token was drawn from
    allowed = _reference_filter(step_logits.flatten(0, 1), top_k, top_p, min_p).view_as(step_logits)
    was_allowed = allowed.gather(-1, out.unsqueeze(-1)).squeeze(-1)
    assert was_allowed.all()
    assert (allowed.sum(-1) < allowed.size(-1)).float().mean() > 0.5, "the filters must cut for the test to mean anything"


class _FixedHead(torch.nn.Module):
    """An lm_head that answers the same logits at every position, so the test knows the distribution exactly."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, hidden):
        return self.logits.to(hidden.dtype).expand(*hidden.shape[:-1], -1)


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, None), (0, 0.8, None), (12, 1.0, 0.05)])
def test_token_frequencies_match_the_filtered_distribution(policy, tokenizer, top_k, top_p, min_p):
    """4000 draws of one step: the empirical distribution is softmax(logits / T), filtered, renormalised."""
    V = policy.config.vocab_size
    zipf = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 0.6  # a long tail, no token above a few percent
    logits = zipf.log()[torch.randperm(V, generator=torch.Generator().manual_seed(0))]
    model = type(policy)(policy.config).eval()
    model.load_state_dict(policy.state_dict())
    model.lm_head = _FixedHead(logits.float())
    temperature, n = 0.7, 4000
    allowed = _reference_filter((logits / temperature)[None], top_k, top_p, min_p)[0]
    expected = torch.where(allowed, (logits / temperature).softmax(-1), 0.0)
    expected /= expected.sum()
    ids, mask = encode_prompts(tokenizer, ["the old cat"], 64)
    how = Sampling(1, stop_ids=[tokenizer.pad_token_id], pad_id=tokenizer.pad_token_id, temperature=temperature, top_k=top_k,
                   top_p=top_p, min_p=min_p)
    out, _ = sample(model, ids.repeat(n, 1), mask.repeat(n, 1), how, generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(out[:, 0], minlength=V).double() / n
    assert observed[~allowed].sum() == 0
    assert 10 <= allowed.sum() < V or (top_k, top_p, min_p) == (0, 1.0, None)
    # The total variation of n draws over k equally likely tokens is about 0.4 * sqrt(k / n) (0.13 for all 400 here);
    # allow 1.5 times that. Sampling without the temperature lands at 0.23 and 0.10 in the first and last cases.
    k = int(allowed.sum())
    assert 0.5 * (observed - expected).abs().sum().item() < 0.6 * (k / n) ** 0.5


DEVICES = ["cpu"] + ["cuda"] * torch.cuda.is_available()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_exponential_race_draws_the_tokens_multinomial_draws(dtype, device):
    """draw() is torch.multinomial(p, 1) without its host syncs: the same token in every row, and the generator
    left where multinomial leaves it, over filtered (zero-probability) and peaked distributions alike."""
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        V = int(torch.randint(2, 300, (1,), generator=g))
        logits = torch.randn(8, V, generator=g, dtype=dtype) * 4
        logits[torch.rand(8, V, generator=g) < 0.6] = float("-inf")  # as top_k / top_p / min_p leave them
        logits[:, seed % V] = 0.0
        probs = logits.softmax(-1).to(device)
        ours, theirs = (torch.Generator(device).manual_seed(seed) for _ in range(2))
        for _ in range(3):  # consecutive tokens: the generator's state carries over
            assert torch.equal(draw(probs, ours), torch.multinomial(probs, 1, generator=theirs).squeeze(1))
        assert torch.equal(ours.get_state(), theirs.get_state())
