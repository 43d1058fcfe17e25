"""Per-token log-probs without [N, V] float32 log-softmax tensors.

- linear_logprobs(hidden, weight, targets): fused with the lm_head, what online_dpo.py uses; never materialises
  the logits. The element-wise work on each logits tile runs in PyTorch, or in Triton on CUDA (triton_tiles.py).
- naive_linear_logprobs, naive_token_logprobs: the oracles (float32 logits, log_softmax, gather), kept for the tests
  and for models whose head transforms its logits (online_dpo.completion_logprobs falls back to them there).
- fp32_head: a forward hook that runs a bf16 reward model's score head in float32 (online_dpo.load_frozen).
- decode.py: how sample() runs its decode steps, eagerly (EAGER) or compiled (CompiledDecoder, --torch_compile),
  and draws each token (filter_logits, draw: the exponential race).
- lora.py: --use_peft's adapters (LoRALinear, AdaptersOff) and their files in peft's layout.
- judge.py: the local LLM judge's questions (JUDGE_PROMPT, judge_texts) and its forward (judge_locally).
- durable.py: writes that land in one rename (written_in_place), and signals deferred to the end of a step.
"""

from dpo_kernels.logprobs import fp32_head, linear_logprobs, naive_linear_logprobs, naive_token_logprobs

__all__ = ["fp32_head", "linear_logprobs", "naive_linear_logprobs", "naive_token_logprobs"]
