"""dpo_kernels.linear_logprobs (lm_head fused with the log-softmax) against float64 ground truth and the naive oracle."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from dpo_kernels import linear_logprobs, naive_linear_logprobs


def _case(n, h, v, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype) / h**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)  # non-uniform and sign-changing, as DPO's
    return hidden, weight, targets, upstream


def _truth(hidden, weight, targets, temperature=1.0):
    """Exact math in float64 on the given (possibly bf16-rounded) inputs."""
    return naive_linear_logprobs(hidden.double(), weight.double(), targets, temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_float64_with_partial_last_tiles(temperature):
    hidden, weight, targets, _ = _case(11, 6, 23, dtype=torch.float64)
    targets[-1] = 22  # a target in the partial last vocabulary tile
    hidden.requires_grad_(), weight.requires_grad_()
    fn = lambda h, w: linear_logprobs(h, w, targets, temperature, token_tile=4, vocab_tile=5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("scale, temperature", [(1.0, 1.0), (40.0, 1.0), (1.0, 0.6)])
def test_float32_values_and_gradients_match_the_naive_oracle(scale, temperature):
    """scale 40: peaked rows, p(target) close to 1 or to 0. Tiles that split both axes unevenly. Values within 1e-5
    of the naive float32 oracle; gradients no further from the float64 truth than the oracle's (float32 sums in
    another order)."""
    hidden, weight, targets, upstream = _case(50, 32, 1000, seed=1, scale=scale)
    targets[:3] = torch.tensor([999, 998, 0])  # in the partial last vocabulary tile and in the first
    targets[3:13] = (hidden @ weight.T).argmax(-1)[3:13]  # the most likely token: p(target) -> 1 when peaked
    results = []
    for fn, dtype in ((lambda h, w: linear_logprobs(h, w, targets, temperature, token_tile=16, vocab_tile=300), torch.float32),
                      (lambda h, w: naive_linear_logprobs(h, w, targets, temperature), torch.float32),
                      (lambda h, w: naive_linear_logprobs(h, w, targets, temperature), torch.float64)):
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        out = fn(h, w)
        results.append((out, *torch.autograd.grad((out * upstream.to(dtype)).sum(), (h, w))))
    (ours, gh, gw), (naive, gh_naive, gw_naive), (_, gh_true, gw_true) = results
    assert ours.dtype == torch.float32
    assert (ours - naive).abs().max() <= 1e-5 * max(1.0, naive.abs().max().item())
    for mine, oracle, true in ((gh, gh_naive, gh_true), (gw, gw_naive, gw_true)):
        err, err_oracle = (mine.double() - true).abs().max(), (oracle.double() - true).abs().max()
        assert err <= max(2 * err_oracle, 1e-6 * true.abs().max()), (err, err_oracle)
    if scale > 1:
        assert (naive > -1e-3).any() and (naive < -20).any(), "the peaked case must contain p ~ 1 and p ~ 0"


def test_all_negative_logits_and_non_contiguous_inputs():
    hidden, weight, targets, _ = _case(24, 16, 200, seed=2)
    bias_dim = torch.ones(24, 1)  # a constant feature whose weight is very negative: every logit is below -50
    hidden = torch.cat([hidden, bias_dim], 1)
    weight = torch.cat([weight, torch.full((200, 1), -60.0)], 1)
    hidden_t = hidden.T.contiguous().T  # same values, transposed strides
    weight_nc = torch.cat([weight, weight], 0)[::2]  # every other row of a bigger matrix: a strided view
    assert not hidden_t.is_contiguous() and not weight_nc.is_contiguous()
    logits = hidden @ weight_nc.T
    assert (logits < -50).all()
    ours = linear_logprobs(hidden_t, weight_nc, targets, token_tile=7, vocab_tile=64)
    assert torch.allclose(ours.double(), _truth(hidden, weight_nc, targets), atol=1e-5, rtol=0)


def test_bf16_inputs_are_no_worse_than_the_naive_bf16_pipeline():
    """With bf16 hidden states and weight, the naive pipeline rounds the logits to bf16 before the log-softmax; the
    fused one multiplies into float32 tiles. Error against exact math on the same bf16 inputs."""
    hidden, weight, targets, _ = _case(256, 64, 4096, seed=3, dtype=torch.bfloat16, scale=3.0)
    truth = _truth(hidden, weight, targets)
    ours = linear_logprobs(hidden, weight, targets, token_tile=64, vocab_tile=1000)
    naive_bf16 = (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    err_ours, err_naive = (ours.double() - truth).abs().max(), (naive_bf16.double() - truth).abs().max()
    assert ours.dtype == torch.float32
    assert err_ours <= err_naive and err_ours < 1e-4, (err_ours, err_naive)


def test_entropy_matches_the_exact_entropy_and_carries_no_gradient():
    hidden, weight, targets, _ = _case(30, 8, 77, seed=4)
    h = hidden.clone().requires_grad_()
    logp, entropy = linear_logprobs(h, weight, targets, 0.8, entropy=True, token_tile=8, vocab_tile=20)
    p = (hidden.double() @ weight.double().T / 0.8).softmax(-1)
    assert torch.allclose(entropy.double(), -(p * p.log()).sum(-1), atol=1e-5)
    assert not entropy.requires_grad and logp.requires_grad


def test_gradients_reach_a_weight_tied_to_the_embeddings():
    """The lm_head weight is the embedding matrix: its gradient is the sum of both uses."""
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ids, targets = torch.randint(0, 50, (12,), generator=g), torch.randint(0, 50, (12,), generator=g)
    hidden = torch.tanh(emb[ids])
    (ours,) = torch.autograd.grad(linear_logprobs(hidden, emb, targets, vocab_tile=16).sum(), emb)
    (naive,) = torch.autograd.grad(naive_linear_logprobs(torch.tanh(emb[ids]), emb, targets).sum(), emb)
    assert torch.allclose(ours, naive, atol=1e-12)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"expected hidden \(N, H\), weight \(V, H\)"):
        linear_logprobs(torch.zeros(4, 8), torch.zeros(10, 9), torch.zeros(4, dtype=torch.long))


TRITON_CHECK = r"""
import sys, torch
from dpo_kernels import linear_logprobs
device, N, H, V, dtype, scale = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], float(sys.argv[6])
g = torch.Generator().manual_seed(0)
hidden = (torch.randn(N, H, generator=g) * scale).to(device, getattr(torch, dtype))
weight = (torch.randn(V, H, generator=g) / H**0.5).to(device, getattr(torch, dtype))
targets = torch.randint(0, V, (N,), generator=g).to(device)
targets[0], targets[1] = V - 1, 0  # the partial last tile and the first
targets[2:6] = (hidden.float() @ weight.float().T).argmax(-1)[2:6]  # peaked rows when scale is large
upstream = torch.randn(N, generator=g).to(device)  # sign-changing
out = {}
for tiles in ("torch", "triton"):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = linear_logprobs(h, w, targets, 0.8, entropy=True, token_tile=16, vocab_tile=V // 3 + 5, tiles=tiles)
    out[tiles] = (logp, entropy, *torch.autograd.grad((logp * upstream).sum(), (h, w)))
zmax = (hidden.float() @ weight.float().T).abs().max().item()  # float32 rounding of lse - E[z] scales with the logits
for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight"), out["torch"], out["triton"]):
    err = (a.double() - b.double()).abs().max().item()
    tol = 1e-5 * max(1.0, a.double().abs().max().item(), zmax if name == "entropy" else 0.0)
    print(name, err, tol)
    assert err <= tol, (name, err, tol)
print("OK")
"""


def _triton_check(env, *args):
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK, *map(str, args)], capture_output=True, text=True,
                          env=os.environ | env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("dtype, scale", [("float32", 1.0), ("bfloat16", 30.0)])
def test_triton_tiles_match_the_pytorch_tiles_in_the_interpreter(dtype, scale):
    """The Triton fold and gradient kernels, run by Triton's CPU interpreter at a small shape with partial tiles,
    temperature 0.8, entropy, targets at both ends of the vocabulary and (bf16, scale 30) peaked rows."""
    _triton_check({"TRITON_INTERPRET": "1"}, "cpu", 40, 32, 700, dtype, scale)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_tiles_at_full_size_on_cuda(dtype):
    _triton_check({}, "cuda", 2048, 896, 151936, dtype, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_operands_on_cuda_take_the_bf16_matmul_and_lose_nothing_against_float32_tiles():
    """On CUDA, bf16 hidden states and weight give their logits tiles from torch.mm(..., out_dtype=float32), the
    tensor-core matmul (until then both were copied to float32 and multiplied without TF32). Products of bf16 numbers
    are exact in float32, so against float64 math on the same bf16 inputs the values and gradients must be as close
    as those of the float32 tiles (the same function on float32 copies), bar the order of the float32 sums."""
    hidden, weight, targets, upstream = (t.cuda() for t in _case(2048, 896, 32768, seed=5, dtype=torch.bfloat16,
                                                                 scale=3.0))
    truth_h = hidden.double().requires_grad_()
    truth_w = weight.double().requires_grad_()
    truth = naive_linear_logprobs(truth_h, truth_w, targets)
    (truth * upstream).sum().backward()
    results = {}
    for name, dtype in (("bf16 matmul", torch.bfloat16), ("float32 tiles", torch.float32)):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        logp = linear_logprobs(h, w, targets, tiles="torch")
        (logp.double() * upstream).sum().backward()
        results[name] = [(x.double() - t).abs().max().item() for x, t in
                         ((logp, truth), (h.grad.float(), truth_h.grad), (w.grad.float(), truth_w.grad))]
    ours, before = results["bf16 matmul"], results["float32 tiles"]
    print(f"max error against float64 (values, d hidden, d weight): bf16 matmul {ours}, float32 tiles {before}")
    assert ours[0] <= 2 * before[0] + 1e-6
    # The gradients come back in the inputs' dtype: bf16 rounding (2**-8 relative) of gradients of order 1.
    scale_h, scale_w = truth_h.grad.abs().max().item(), truth_w.grad.abs().max().item()
    assert ours[1] <= before[1] + 2**-8 * scale_h and ours[2] <= before[2] + 2**-8 * scale_w


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_a_triton_that_cannot_launch_falls_back_to_the_pytorch_tiles_with_one_line():
    """Triton imports where it cannot launch (a slim GPU image without a C compiler; here, the CPU without Triton's
    interpreter): the probe's one launch fails, it says so in one line, once, and answers False. Under the
    interpreter the same probe launches and answers True."""
    code = ("import torch; from dpo_kernels.logprobs import _triton_works; d = torch.device('cpu'); "
            "print(_triton_works(d), _triton_works(d))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {name: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, env=env | extra,
                                 timeout=300) for name, extra in (("fails", {}), ("works", {"TRITON_INTERPRET": "1"}))}
    assert runs["fails"].stdout.split() == ["False", "False"], runs["fails"].stderr[-2000:]
    assert runs["fails"].stderr.count("dpo_kernels: Triton does not run on cpu") == 1, runs["fails"].stderr[-2000:]
    assert "using the PyTorch tiles" in runs["fails"].stderr
    assert runs["works"].stdout.split() == ["True", "True"], runs["works"].stderr[-2000:]
    assert "Triton does not run" not in runs["works"].stderr
