"""Fused log-prob gathering: per-token log p(target) without a [B, T, V] log_softmax.

Only a PyTorch path for now; the Triton kernel (CUDA) and the fusion with the lm_head come later and keep this
signature's meaning.
"""

from kernels.logprobs import naive_token_logprobs, token_logprobs

__all__ = ["token_logprobs", "naive_token_logprobs"]
