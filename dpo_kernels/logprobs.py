"""log p(target) straight from the last hidden states and the lm_head weight, never holding [N, V] logits.

    logits = hidden @ weight.T / temperature          # (N, V): only ever one (token tile, vocab tile) of it
    logp   = logits[target] - logsumexp(logits)

Forward folds the vocabulary tile by tile into a running max, a running sum of exp and the target's logit, all in
float32 (bf16 inputs are multiplied into float32 tiles, so logits are never rounded to bf16 before the
log-sum-exp: that rounding, not the log-sum-exp, is what costs precision with bf16 weights). Only the log-sum-exp
(N,) is kept for backward, which recomputes each tile and turns it into softmax - onehot.

This is the PyTorch path, the one the CPU runs. The naive functions are the oracles for the tests, the A/B path of
benchmarks/bench_logprobs.py, and what online_dpo.completion_logprobs(impl="naive") uses (also for a model whose
head has a bias, a softcap or a logit scale, which the fused path leaves out)."""

import math
import os
import sys

import torch


def naive_token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The oracle: float32 log_softmax over the whole vocabulary, then gather. (..., V), (...) -> (...) float32."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def naive_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                          entropy: bool = False):
    """The oracle: full float32 logits, log_softmax, gather. -> logp (N,) [, entropy (N,)]."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logp_all = (hidden.to(acc) @ weight.to(acc).T / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1).detach()


def fp32_head(head: torch.nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """A forward hook that makes a bf16 model's head (a reward model's score) compute in float32 on its bf16 inputs:
    the products of bf16 numbers are exact, so the output keeps float32's resolution instead of bf16's 3 significant
    digits, which would tie rewards that differ."""
    with torch.autocast(inputs[0].device.type, enabled=False):
        bias = None if head.bias is None else head.bias.float()
        return torch.nn.functional.linear(inputs[0].float(), head.weight.float(), bias)


def _tiles(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _fold_torch(z, targets, v0, temperature, run_max, run_sum, run_zsum, target_logit) -> None:
    """Fold a logits tile z (rows, width), pre-temperature, into the running states of its rows, in place."""
    z = z.div_(temperature)
    new_max = torch.maximum(run_max, z.max(-1).values)
    scale, e = (run_max - new_max).exp(), (z - new_max[:, None]).exp_()
    if run_zsum is not None:  # sum of exp(z - max) * z, for the entropy, rescaled like the sum
        run_zsum.mul_(scale).add_((e * z).sum(-1))
    run_sum.mul_(scale).add_(e.sum(-1))
    run_max.copy_(new_max)
    here = (targets >= v0) & (targets < v0 + z.shape[1])  # each target is in exactly one tile
    picked = z.gather(1, (targets - v0).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    target_logit.add_(torch.where(here, picked, 0.0))


def _grad_torch(z, targets, v0, temperature, lse, g) -> None:
    """A logits tile z (rows, width), pre-temperature, into g * (onehot(target) - softmax) / temperature, in place."""
    d = z.div_(temperature).sub_(lse[:, None]).exp_().mul_(-g[:, None])
    rows = ((targets >= v0) & (targets < v0 + z.shape[1])).nonzero().squeeze(1)
    d[rows, targets[rows] - v0] += g[rows]
    d.div_(temperature)


def _low(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16 operands on CUDA: the logits tiles come from the bf16 tensor-core matmul with a float32 output. Products
    of two bf16 numbers are exact in float32 and the sums are float32, as in the float32 matmul (no TF32), which
    would first copy both to float32 and run several times slower."""
    return hidden.is_cuda and hidden.dtype == weight.dtype == torch.bfloat16


def _logits_tile(h: torch.Tensor, w: torch.Tensor, low: bool) -> torch.Tensor:
    """h (rows, H) @ w (width, H).T as a float32 (or float64) tile."""
    if low:
        return torch.mm(h, w.T, out_dtype=torch.float32)
    return h @ w.T


def _tile_ops(use_triton: bool):
    if not use_triton:
        return _fold_torch, _grad_torch
    from dpo_kernels import triton_tiles

    return triton_tiles.fold, triton_tiles.grad


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, token_tile, vocab_tile, want_entropy, use_triton):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for gradcheck
        fold, _ = _tile_ops(use_triton)
        low = _low(hidden, weight)
        h = hidden if low else hidden.to(acc)  # (N, H): small next to the logits
        run_max = torch.full(targets.shape, -torch.inf, dtype=acc, device=hidden.device)
        run_sum, target_logit = torch.zeros_like(run_max), torch.zeros_like(run_max)
        run_zsum = torch.zeros_like(run_max) if want_entropy or use_triton else None
        for v0, v1 in _tiles(weight.shape[0], vocab_tile):  # vocabulary outside: each weight tile is read (cast) once
            w = weight[v0:v1] if low else weight[v0:v1].to(acc)
            for t0, t1 in _tiles(h.shape[0], token_tile):
                fold(_logits_tile(h[t0:t1], w, low), targets[t0:t1], v0, temperature, run_max[t0:t1], run_sum[t0:t1],
                     None if run_zsum is None else run_zsum[t0:t1], target_logit[t0:t1])
        lse = run_max + run_sum.log()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.token_tile, ctx.vocab_tile, ctx.use_triton = temperature, token_tile, vocab_tile, use_triton
        logp = target_logit - lse
        if not want_entropy:
            return logp
        entropy = lse - run_zsum / run_sum  # H = lse - E_p[z]
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, *_):  # d logp / d z = onehot(target) - softmax(z), z = hidden @ weight.T / T
        hidden, weight, targets, lse = ctx.saved_tensors
        _, grad_tile = _tile_ops(ctx.use_triton)
        acc = lse.dtype
        low = _low(hidden, weight)  # the recomputed logits as in forward; the gradient matmuls take float32 tiles
        h, g = hidden.to(acc), grad_logp.to(acc).contiguous()
        grad_h = torch.zeros_like(h)
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        for v0, v1 in _tiles(weight.shape[0], ctx.vocab_tile):
            w = weight[v0:v1].to(acc)
            grad_w_tile = torch.zeros_like(w)
            for t0, t1 in _tiles(h.shape[0], ctx.token_tile):
                if low:
                    d = _logits_tile(hidden[t0:t1], weight[v0:v1], low)
                else:
                    d = h[t0:t1] @ w.T
                grad_tile(d, targets[t0:t1], v0, ctx.temperature, lse[t0:t1], g[t0:t1])
                grad_h[t0:t1].addmm_(d, w)
                grad_w_tile.addmm_(d.T, h[t0:t1])
            grad_w[v0:v1] = grad_w_tile
        return grad_h.to(hidden.dtype), grad_w, None, None, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    entropy: bool = False, token_tile: int = 1024, vocab_tile: int = 4096, tiles: str = "auto"):
    """log p(targets) under softmax(hidden @ weight.T / temperature), without [N, V] logits.

    hidden (N, H) and weight (V, H) of any float dtype (the lm_head's; tied to the embeddings is fine), targets (N,)
    int64 -> float32 (N,) (float64 for float64 inputs), differentiable w.r.t. hidden and weight. With entropy=True
    also returns the per-token entropy (N,), without gradient. tiles: the element-wise work on each logits tile in
    PyTorch or in Triton (dpo_kernels/triton_tiles.py); auto picks Triton on CUDA when it is installed. Memory besides the gradients: one (token_tile,
    vocab_tile) float32 tile (16 MB by default) and a float32 copy of a (vocab_tile, H) slice of the weight."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (N, H), weight (V, H), targets (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if tiles not in ("auto", "torch", "triton"):
        raise ValueError(f"tiles must be auto, torch or triton, got {tiles!r}")
    use_triton = tiles == "triton" or (tiles == "auto" and hidden.is_cuda and _triton_works(hidden.device))
    use_triton = use_triton and torch.promote_types(hidden.dtype, torch.float32) == torch.float32  # not for float64
    with torch.autocast(hidden.device.type, enabled=False):  # the tiles stay float32 inside a bf16 autocast region
        return _LinearLogprobs.apply(hidden, weight, targets.contiguous(), temperature, token_tile, vocab_tile, entropy,
                                     use_triton)


_TRITON_WORKS = {}  # device: whether a Triton launch runs there


def _triton_works(device: torch.device) -> bool:
    """Whether Triton runs on `device`: one tiny launch, once per device. Triton imports without a C compiler (slim
    images) and fails only at its first launch, which builds a launcher: then one line says so and the PyTorch tiles
    run instead."""
    if device not in _TRITON_WORKS:
        try:
            from dpo_kernels import triton_tiles
        except ImportError:  # not installed: the PyTorch tiles, as on the CPU
            _TRITON_WORKS[device] = False
            return False
        z = torch.zeros(1, 2, device=device)
        states = [torch.full((1,), -math.inf, device=device)] + [torch.zeros(1, device=device) for _ in range(3)]
        try:
            triton_tiles.fold(z, torch.zeros(1, dtype=torch.long, device=device), 0, 1.0, *states)
            _TRITON_WORKS[device] = bool(torch.isclose(states[1], torch.tensor(2.0, device=device)).item())
        except Exception as e:  # no compiler, no driver, an unsupported GPU
            _TRITON_WORKS[device] = False
            if os.environ.get("RANK", "0") == "0":
                first_line = (str(e).strip().splitlines() or [""])[0][:160]
                print(f"dpo_kernels: Triton does not run on {device} ({type(e).__name__}: {first_line}); "
                      "using the PyTorch tiles", file=sys.stderr)
    return _TRITON_WORKS[device]
