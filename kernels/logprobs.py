"""log p(target) = logit[target] - logsumexp(logits), chunked over rows so that the float32 working set is one
(chunk_rows, V) tile, never the whole [N, V] log_softmax (for Qwen2, V = 151,936: 16 x 320 tokens would be 3.1 GB).

Backward needs softmax(logits) - onehot(target); it is recomputed tile by tile from the saved row max and
log-sum-exp, so besides the logits themselves the only [N, V] tensor is the gradient, in the logits' dtype."""

import torch


def naive_token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The oracle: float32 log_softmax over the whole vocabulary, then gather. (..., V), (...) -> (...) float32."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, chunk_rows):  # logits (N, V), targets (N,)
        # log-sum-exp kept as max + log(sum(exp(x - max))): a single float32 lse of a row of large logits would
        # lose the low bits that p(target) close to 1 needs.
        acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for gradcheck
        row_max = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        log_sum = torch.empty_like(row_max)
        for i in range(0, logits.shape[0], chunk_rows):
            chunk = logits[i : i + chunk_rows].to(acc)
            row_max[i : i + chunk_rows] = chunk.max(-1).values
            log_sum[i : i + chunk_rows] = (chunk - row_max[i : i + chunk_rows, None]).exp_().sum(-1).log_()
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).to(acc)
        ctx.save_for_backward(logits, targets, row_max, log_sum)
        ctx.chunk_rows = chunk_rows
        return (target_logits - row_max) - log_sum

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        logits, targets, row_max, log_sum = ctx.saved_tensors
        grad = torch.empty_like(logits)
        rows = torch.arange(logits.shape[0], device=logits.device)
        for i in range(0, logits.shape[0], ctx.chunk_rows):
            j = slice(i, i + ctx.chunk_rows)
            g = grad_out[j].to(row_max.dtype)[:, None]
            chunk = (logits[j].to(row_max.dtype) - row_max[j, None]).sub_(log_sum[j, None]).exp_().mul_(-g)  # -g * softmax
            chunk[rows[j] - i, targets[j]] += g[:, 0]  # + g * onehot(target)
            grad[j] = chunk
        return grad, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """log p(targets) under softmax(logits), float32 (float64 for float64 logits), differentiable w.r.t. logits.

    logits (..., V) of any float dtype, targets (...) int64 -> (...) float32. Accumulates in float32 whatever the
    logits' dtype; peak extra memory is one (chunk_rows, V) float32 tile, by default about 64 MB."""
    shape = targets.shape
    chunk_rows = chunk_rows or max(1, (1 << 24) // logits.shape[-1])
    out = _TokenLogprobs.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), chunk_rows)
    return out.view(shape)
