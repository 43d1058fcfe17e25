"""Numerical kernels for online_dpo.py. (Not `kernels/`: that is the import name of Hugging Face's kernels package,
which transformers imports.)

- linear_logprobs(hidden, weight, targets): per-token log-probs fused with the lm_head, never materialising the
  [N, V] logits; the element-wise work on each logits tile runs in PyTorch, or in Triton on CUDA (triton_tiles.py).
- naive_linear_logprobs, naive_token_logprobs: the oracles (float32 logits, log_softmax, gather), kept for the tests
  and for models whose head transforms its logits (online_dpo.completion_logprobs falls back to them there).
- fp32_head: a forward hook that runs a bf16 reward model's score head in float32 (online_dpo.load_frozen).
- CompiledDecoder, compile_problem (compiled_decode.py): --torch_compile's decode step, compiled once, on CUDA
  replayed as CUDA graphs.
"""

from dpo_kernels.compiled_decode import CompiledDecoder, compile_problem
from dpo_kernels.logprobs import fp32_head, linear_logprobs, naive_linear_logprobs, naive_token_logprobs

__all__ = ["CompiledDecoder", "compile_problem", "fp32_head", "linear_logprobs", "naive_linear_logprobs",
           "naive_token_logprobs"]
