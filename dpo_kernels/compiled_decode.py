"""The compiled decode step (--torch_compile): online_dpo.Decoder's one-token step compiled once with dynamic shapes
over a kept KV cache (gpt-fast's recipe for a hand-written KV-cache sampler); on CUDA in mode reduce-overhead, which
replays it as a CUDA graph, so that a token no longer costs a launch per kernel. Whatever cannot be compiled decodes
eagerly, through the eager Decoder it was given, saying why (online_dpo.make_decoder).
"""

import math
import os
import time

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import StaticCache

STOP_CHECK_EVERY = 8  # compiled, on CUDA: tokens between the checks whether every row has stopped
WIDTH_STEP = 32  # compiled, on CUDA: cache widths are P + T rounded up to a multiple of this
GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"


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



class CompiledDecoder:
    """The decode step compiled once with dynamic shapes; on CUDA, reduce-overhead (a CUDA graph per
    shape). Graphs need fixed addresses: each row count's KV cache is allocated once, max_width
    wide, widths as views. CUDA rounds widths up to WIDTH_STEP and checks the end every
    STOP_CHECK_EVERY tokens; the CPU takes exact widths and checks every token (faster there). `eager`: the
    Decoder whose step it compiles, and which decodes any other model (the reference) and after a failed compile."""

    def __init__(self, eager, policy, max_width, device, say=print, width_step=None, check_every=1):
        self.eager = eager
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
        self.step = torch.compile(eager.step, fullgraph=fullgraph, dynamic=True, mode=mode)
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
            return self.eager.decode_cache(model, cache, K)
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
            return self.eager(model, token, mask, position_ids, cache)
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
            return self.eager(model, token, mask, position_ids, cache)
        new = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        if new:
            self.graphs += new
            self.compile_seconds += time.perf_counter() - start
        return logits.clone() if self.cuda else logits

    def stats(self):
        return {"compile/graphs": self.graphs, "time/compile": self.compile_seconds}
