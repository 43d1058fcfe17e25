"""Prefix sharing: each pair in one [prompt | chosen | rejected] row, each prompt prefilled once for its K samples.

The references are independent of online_dpo's packing: every completion run alone, unpadded, through a plain
forward in float64, and the DPO loss written out here."""

import json
import os
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

import online_dpo
from dpo_support.checks import check_packing
from online_dpo import Args, Sampling, completion_logprobs, encode_prompts, sample
from tests import assets
from tests.test_sampler import _FixedHead

B = 3


@pytest.fixture(scope="module")
def models(tiny, tokenizer, tmp_path_factory):
    """A Qwen2 and a Llama, float64, each with eager and sdpa attention."""
    out = {}
    for arch in ("qwen2", "llama"):
        path = str(tmp_path_factory.mktemp(arch))
        assets.make_causal_lm(path, tokenizer, arch, seed=7)
        for attn in ("eager", "sdpa"):
            out[arch, attn] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                                   attn_implementation=attn).eval()
    return out


def _pairs(seed=0):
    """B left-padded prompts of different lengths; 2B right-padded completions (chosen, then rejected): one ends at
    its first token, one runs to the full width T."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 300, (n,), generator=g) for n in (3, 9, 6)]
    completions = [torch.randint(5, 300, (n,), generator=g) for n in (1, 5, 8, 4, 8, 2)]
    P, T = max(map(len, prompts)), max(map(len, completions))
    prompt_ids, prompt_mask = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, P, dtype=torch.long)
    ids, mask = torch.zeros(2 * B, T, dtype=torch.long), torch.zeros(2 * B, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = p, 1
    for i, c in enumerate(completions):
        ids[i, : len(c)], mask[i, : len(c)] = c, 1
    return prompts, completions, (prompt_ids, prompt_mask, ids, mask)


def _alone(model, prompts, completions):
    """Each completion's per-token log-probs from its own unpadded forward: a list of 2B tensors."""
    out = []
    for i, c in enumerate(completions):
        p = prompts[i % B]
        logits = model(input_ids=torch.cat([p, c])[None]).logits[0].log_softmax(-1)
        out.append(logits[len(p) - 1 : len(p) - 1 + len(c)].gather(1, c[:, None]).squeeze(1))
    return out


def _dpo(chosen, rejected, ref_chosen, ref_rejected, beta=0.1):
    return -F.logsigmoid(beta * ((chosen - rejected) - (ref_chosen - ref_rejected))).mean()


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("arch,attn", [("qwen2", "eager"), ("qwen2", "sdpa"), ("llama", "eager"), ("llama", "sdpa")])
def test_packed_pairs_give_the_logprobs_and_gradients_of_separate_forwards(models, arch, attn, impl, monkeypatch):
    """float64: per-token log-probs of chosen and rejected from the one packed row per pair, and the parameter
    gradients of the DPO loss, equal those of each completion run alone to 1e-10."""
    # transformers' RMSNorm and eager softmax go through float32 whatever the dtype: a gradient summed before that
    # rounding (one prompt, two completions) and one summed after it differ by ~1e-8. Here they stay in float64.
    softmax = F.softmax
    monkeypatch.setattr(F, "softmax", lambda x, dim=None, dtype=None, **kw: softmax(x, dim=dim, **kw))
    for norm in (Qwen2RMSNorm, LlamaRMSNorm):
        monkeypatch.setattr(norm, "forward", lambda self, x: self.weight * x * torch.rsqrt(
            x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    model = models[arch, attn]
    prompts, completions, (prompt_ids, prompt_mask, ids, mask) = _pairs()
    params = list(model.parameters())
    ref_sums = torch.tensor([-3.0, -7.5, -1.25, -6.0, -2.0, -4.5], dtype=torch.float64)  # a fixed reference

    alone = _alone(model, prompts, completions)
    sums = torch.stack([a.sum() for a in alone])
    expected_grads = torch.autograd.grad(_dpo(sums[:B], sums[B:], ref_sums[:B], ref_sums[B:]), params)

    packed = completion_logprobs(model, prompt_ids, prompt_mask, ids, mask, impl, packed=True)
    assert packed.shape == ids.shape and packed.dtype == torch.float64
    for i, (a, c) in enumerate(zip(alone, completions)):
        torch.testing.assert_close(packed[i, : len(c)], a.detach(), atol=1e-10, rtol=0)
        assert (packed[i, len(c):] == 0).all()
    s = packed.sum(1)
    grads = torch.autograd.grad(_dpo(s[:B], s[B:], ref_sums[:B], ref_sums[B:]), params)
    for name, g, e in zip([n for n, _ in model.named_parameters()], grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=0, msg=lambda m: name + m)
    assert max(g.abs().max() for g in grads) > 1e-3, "the loss must have gradients for this test to mean anything"

    # The unshared path (two prompt rows per pair) agrees as well.
    unshared = completion_logprobs(model, prompt_ids.repeat(2, 1), prompt_mask.repeat(2, 1), ids, mask, impl)
    torch.testing.assert_close(unshared.detach(), packed.detach(), atol=1e-10, rtol=0)


def test_packing_checks_pass_on_models_that_take_a_4d_mask(models, capsys):
    args = Args(max_length=64, max_new_tokens=16)
    assert check_packing(args, online_dpo, models["qwen2", "sdpa"], models["llama", "eager"]) is True
    assert check_packing(Args(prefix_sharing=False), online_dpo, models["qwen2", "sdpa"]) is False
    assert capsys.readouterr().out == ""  # nothing to say


def test_the_packing_trial_is_not_fooled_by_dropout(tiny, tokenizer, tmp_path, capsys):
    """A policy in train mode with dropout (--disable_dropout False): the trial runs in eval mode, so random masks
    cannot make the rejected log-probs move with the chosen; the model is back in train mode after."""
    assets.make_causal_lm(str(tmp_path), tokenizer, "qwen2", seed=7)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), attention_dropout=0.5).train()
    assert check_packing(Args(max_length=64, max_new_tokens=16), online_dpo, model) is True and model.training
    assert capsys.readouterr().out == ""


def test_packing_falls_back_with_one_line_saying_why(models, capsys):
    """A model that drops the 4D mask (its rejected tokens would see the chosen), an attention that cannot take
    one, a forward that refuses it, a sliding window shorter than a packed row: the unshared path, and one line."""
    args = Args(max_length=64, max_new_tokens=16)
    model = models["qwen2", "sdpa"]
    forward = model.forward
    try:
        # Without the mask: the restarting position ids make transformers see two sequences (the rejected
        # would not see its prompt); without those too, a causal mask (it would see the chosen).
        for dropped in ({"attention_mask": None}, {"attention_mask": None, "position_ids": None}):
            model.forward = lambda **kw: forward(**(kw | dropped))
            assert check_packing(args, online_dpo, model) is False
            assert capsys.readouterr().out == "prefix sharing off in training: the model does not apply a 4D mask\n"

        def refuses(**kw):
            raise ValueError("custom masks are not supported")
        model.forward = refuses
        assert check_packing(args, online_dpo, model) is False
        assert "the model refuses a 4D attention mask (ValueError: custom masks are not supported)" in \
            capsys.readouterr().out
    finally:
        model.forward = forward
    flash = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert check_packing(args, online_dpo, flash) is False
    assert "attn_implementation flash_attention_2 takes no 4D attention mask" in capsys.readouterr().out
    windowed = types.SimpleNamespace(config=types.SimpleNamespace(
        _attn_implementation="sdpa", sliding_window=32))
    assert check_packing(args, online_dpo, windowed) is False
    assert "sliding window (32 tokens)" in capsys.readouterr().out


PROMPTS = ["the cat", "a big old dog sits near the river and sings", "sun", "red stone house under a blue moon"]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_shared_prefill_greedy_equals_generate_for_every_sample(models, tokenizer, arch):
    """K = 3 samples of each left-padded prompt from one prefill: greedy decoding gives each of them what
    model.generate gives the prompt, rows laid out [all 1st samples, all 2nd, all 3rd]."""
    model = models[arch, "sdpa"]
    ids, mask = encode_prompts(tokenizer, PROMPTS, 64)
    pad = tokenizer.pad_token_id
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               eos_token_id=[], pad_token_id=pad)[:, ids.size(1):]
    stop = int(reference[0, 4])  # some rows stop mid-way
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               eos_token_id=[stop], pad_token_id=pad)[:, ids.size(1):]
    out, out_mask = sample(model, ids, mask, Sampling(12, [stop], pad, do_sample=False), 3)
    assert torch.equal(out, reference.repeat(3, 1))
    assert out_mask[: len(PROMPTS)].sum() < out_mask[: len(PROMPTS)].numel()  # a row did stop early


def test_shared_prefill_samples_the_filtered_distribution(policy, tokenizer):
    """2000 samples of one prompt from one prefill, 2 tokens each: both the first token (from the shared prefill's
    logits) and the second (decoded over the copied cache) follow softmax(logits / T) filtered by top_p."""
    V = policy.config.vocab_size
    zipf = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 0.6
    logits = zipf.log()[torch.randperm(V, generator=torch.Generator().manual_seed(1))]
    model = type(policy)(policy.config).eval()
    model.load_state_dict(policy.state_dict())
    model.lm_head = _FixedHead(logits.float())
    temperature, top_p, n = 0.7, 0.8, 2000
    scaled = logits / temperature
    order = scaled.sort(descending=True)
    mass_before = order.values.softmax(-1).cumsum(-1) - order.values.softmax(-1)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[order.indices[mass_before < top_p]] = True  # the token that crosses top_p stays
    expected = torch.where(allowed, scaled.softmax(-1), 0.0)
    expected /= expected.sum()
    ids, mask = encode_prompts(tokenizer, ["the old cat"], 64)
    how = Sampling(2, [tokenizer.pad_token_id], tokenizer.pad_token_id, temperature=temperature, top_p=top_p)
    out, _ = sample(model, ids, mask, how, n, generator=torch.Generator().manual_seed(0))
    assert out.shape == (n, 2)
    k = int(allowed.sum())
    for t in range(2):
        observed = torch.bincount(out[:, t], minlength=V).double() / n
        assert observed[~allowed].sum() == 0
        # The total variation of n draws over k tokens is about 0.4 * sqrt(k / n); allow 1.5 times that.
        assert 0.5 * (observed - expected).abs().sum().item() < 0.6 * (k / n) ** 0.5, t
    assert not torch.equal(out[:, 0], out[:, 1]), "the samples must differ for this test to mean anything"


def _metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


def test_tiny_preset_learns_the_same_with_sharing_on_and_off(tmp_path):
    """The first steps of the tiny preset, sharing on and off: the same metrics to float tolerance."""
    runs = {}
    for on in (True, False):
        out = str(tmp_path / str(on))
        online_dpo.main(online_dpo.cli(["--preset", "tiny", "--max_steps", "4", "--logging_steps", "1",
                                        "--eval_prompts", "0", "--prefix_sharing", str(on), "--output_dir", out]))
        runs[on] = _metrics(out)
    assert len(runs[True]) == len(runs[False]) == 4
    for shared, unshared in zip(runs[True], runs[False]):
        assert shared.keys() == unshared.keys()
        for k, v in unshared.items():
            assert shared[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
