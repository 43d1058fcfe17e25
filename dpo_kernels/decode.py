"""How online_dpo.sample() runs its one-token decode steps over the KV cache (a Decoder), and draws each token
(filter_logits, then draw).

- EAGER (Decoder): the model's forward, as written; a fresh cache per call, each prompt's keys and values copied to
  the rows of its K samples. The default, and the reference the tests hold the compiled step to.
- CompiledDecoder (--torch_compile): the same step compiled once with dynamic shapes over a kept cache (gpt-fast's
  recipe for a hand-written KV-cache sampler); on CUDA in mode reduce-overhead, which replays it as a CUDA graph, so
  that a token no longer costs a launch per kernel. Whatever cannot be compiled decodes eagerly, saying why.
"""

import math
import os
import time

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import MinPLogitsWarper, StaticCache, TopKLogitsWarper, TopPLogitsWarper

STOP_CHECK_EVERY = 8  # compiled, on CUDA: tokens between the checks whether every row has stopped
WIDTH_STEP = 32  # compiled, on CUDA: cache widths are P + T rounded up to a multiple of this
GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"


def next_logits(model, token, mask, position_ids, cache):
    """One decode step: the next-token logits (N, V) after `token` (N,), whose keys and values the
    cache then holds too."""
    out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position_ids, cache=cache)
    return out.logits[:, -1]


def filter_logits(logits, top_k=0, top_p=1.0, min_p=None):
    """Set the logits outside top_k, then top_p, then min_p to -inf, with transformers'
    warpers, as generate() does."""
    if top_k:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1:
        logits = TopPLogitsWarper(top_p)(None, logits)
    if min_p:
        logits = MinPLogitsWarper(min_p)(None, logits)
    return logits


def draw(probs, generator=None):
    """A token per row (N,) from probs (N, V) by the exponential race argmax(p / Exp(1)): how
    torch.multinomial draws one sample (the same tokens, the generator left in the same state), without
    multinomial's checks of its input, which make the host wait for the device at every token."""
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)


class Decoder:
    """How sample() runs its decode steps, by default: eagerly, with a fresh cache per call as wide
    as the batch's longest prompt plus T. CompiledDecoder (--torch_compile) compiles the step."""
    check_every = 1  # tokens between the checks whether every row has stopped (a host sync)

    def width(self, model, prompt_len, max_new_tokens):
        """The columns of the KV cache and of the attention mask."""
        return prompt_len + max_new_tokens

    def decode_cache(self, model, cache, K):
        """The cache to decode from after the prefill of N prompts into `cache`: each prompt's keys
        and values copied to the rows of its K samples, N -> K*N."""
        if K > 1:
            for layer in cache.layers:
                layer.keys = layer.keys.repeat(K, 1, 1, 1)
                layer.values = layer.values.repeat(K, 1, 1, 1)
        return cache

    def __call__(self, model, token, mask, position_ids, cache):
        return next_logits(model, token, mask, position_ids, cache)

    def stats(self):
        """What the log lines report of it (nothing, when eager)."""
        return {}


EAGER = Decoder()


def compile_problem(model):
    """Why the model's decode step cannot be compiled over a static cache, or None."""
    config = model.config
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"transformers' {type(model).__name__} does not support torch.compile with a static cache"
    if config._attn_implementation not in ("eager", "sdpa"):
        return f"attn_implementation {config._attn_implementation} cannot be compiled over a static cache here"
    if any(layer.is_sliding for layer in StaticCache(config=config, max_cache_len=8).layers):
        return "its sliding-window cache layers count tokens in a Python int, which recompiles every token"
    return None


def make_decoder(compiled, policy, max_width, device, say=print):
    """EAGER or, with compiled (--torch_compile), a CompiledDecoder unless the policy cannot be (a line says why)."""
    if not compiled:
        return EAGER
    reason = compile_problem(policy)
    if reason:
        say(f"torch_compile: decoding eagerly, {reason}")
        return EAGER
    return CompiledDecoder(policy, max_width, device, say)


class CompiledDecoder(Decoder):
    """The decode step compiled once with dynamic shapes; on CUDA, reduce-overhead (a CUDA graph per
    shape). Graphs need fixed addresses: each row count's KV cache is allocated once, max_width
    wide, widths as views. CUDA rounds widths up to WIDTH_STEP and checks the end every
    STOP_CHECK_EVERY tokens; the CPU takes exact widths and checks every token (faster there)."""

    def __init__(self, policy, max_width, device, say=print, width_step=None, check_every=1):
        self.say = say  # online_dpo's: rank 0 prints
        self.policy = policy
        self.max_width = max_width
        self.cuda = device.type == "cuda"
        self.width_step = WIDTH_STEP if self.cuda else 1
        self.check_every = STOP_CHECK_EVERY if self.cuda else 1
        if width_step is not None:  # the tests run CUDA's settings on the CPU
            self.width_step = width_step
            self.check_every = check_every
        fullgraph = not isinstance(policy, FSDPModule)  # FSDP2's hooks stay out: graphs between them
        mode = "reduce-overhead" if self.cuda else None
        self.step = torch.compile(next_logits, fullgraph=fullgraph, dynamic=True, mode=mode)
        self.failed = False
        self.tensors = {}  # (rows, dtype): each layer's keys and values, max_width wide
        self.caches = {}  # (rows, dtype, width): a StaticCache whose layers view those
        self.graphs = 0
        self.compile_seconds = 0.0

    def compiles(self, model):
        return model is self.policy and not self.failed

    def width(self, model, prompt_len, max_new_tokens):
        needed = prompt_len + max_new_tokens
        if not self.compiles(model):
            return needed
        return max(needed, min(math.ceil(needed / self.width_step) * self.width_step, self.max_width))

    def decode_cache(self, model, cache, K):
        if not self.compiles(model):
            return super().decode_cache(model, cache, K)
        first = cache.layers[0].keys
        key = (first.size(0) * K, first.dtype)
        width = first.size(2)
        if key not in self.tensors or self.tensors[key][0].size(2) < width:  # (rows, heads, width, dim) each
            shape = (key[0], first.size(1), max(width, self.max_width), first.size(3))  # apart: no aliased inputs
            self.tensors[key] = [first.new_zeros(shape) for _ in range(2 * len(cache.layers))]
            self.caches = {k: c for k, c in self.caches.items() if k[:2] != key}
        if key + (width,) not in self.caches:
            views = StaticCache(config=model.config, max_cache_len=width)
            tensors = self.tensors[key]
            for layer, keys, values in zip(views.layers, tensors[0::2], tensors[1::2]):
                keys = keys[:, :, :width]
                values = values[:, :, :width]
                layer.lazy_initialization(keys, values)  # the layer's sizes
                layer.keys = keys
                layer.values = values
                torch._dynamo.mark_static_address(keys)  # so that a CUDA graph may write to it
                torch._dynamo.mark_static_address(values)
            self.caches[key + (width,)] = views
        views = self.caches[key + (width,)]
        for layer, prefilled in zip(views.layers, cache.layers):  # each prompt's cache to its K samples' rows
            layer.keys.unflatten(0, (K, -1)).copy_(prefilled.keys.expand(K, *prefilled.keys.shape))
            layer.values.unflatten(0, (K, -1)).copy_(prefilled.values.expand(K, *prefilled.values.shape))
            layer.cumulative_length.copy_(prefilled.cumulative_length)
        return views

    def __call__(self, model, token, mask, position_ids, cache):
        if not self.compiles(model):
            return super().__call__(model, token, mask, position_ids, cache)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        if self.cuda:  # the last step's outputs are read no more
            torch.compiler.cudagraph_mark_step_begin()
        # CPU: sdpa's own grouped-query attention (transformers' switch, read by the trace), as inductor's copy
        # of the KV heads (repeat_kv) is slow there.
        before = os.environ.get(GQA_SWITCH)
        if not self.cuda:
            os.environ[GQA_SWITCH] = "1"
        error = None
        try:
            logits = self.step(model, token, mask, position_ids, cache)
        except Exception as e:  # an unsupported model or torch: on eagerly
            error = e
        if before is None:  # as it was, for the eager forwards
            os.environ.pop(GQA_SWITCH, None)
        else:
            os.environ[GQA_SWITCH] = before
        if error is not None:
            self.failed = True
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            self.say(f"torch_compile: decoding eagerly, the decode step did not compile ({type(error).__name__}: "
                f"{first_line})")
            return super().__call__(model, token, mask, position_ids, cache)
        new = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        if new:
            self.graphs += new
            self.compile_seconds += time.perf_counter() - start
        return logits.clone() if self.cuda else logits

    def stats(self):
        return {"compile/graphs": self.graphs, "time/compile": self.compile_seconds}
