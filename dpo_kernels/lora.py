"""LoRA for online_dpo.py's --use_peft, without peft: the adapter layer, the reference with the adapters off, and
the adapter and merged weights in peft's layout (its PeftModel loads them; tests/test_lora.py checks that).

    y = W x + b + (alpha / r) B A dropout(x)        # W, b frozen; A (r, in) Kaiming-uniform, B (out, r) zeros

online_dpo.add_lora calls add_adapters (and load_adapter on a resume); online_dpo.write_model calls save_adapter and,
for the final save, merged().
"""

import contextlib
import json
import os

import safetensors.torch
import torch
import torch.nn.functional as F


class LoRALinear(torch.nn.Linear):
    """nn.Linear plus a low-rank adapter: W x + b + (alpha / r) B A dropout(x). B starts at zero."""
    on = True  # False turns every adapter off at once (AdaptersOff)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if not LoRALinear.on:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale


def add_adapters(model, blocks, names, r, alpha, dropout):
    """Each nn.Linear of the blocks named in `names` (empty: every one) becomes a LoRALinear in place (same weights,
    same names), and all else is frozen. Returns how many; none, and the model is as it was."""
    layers = []
    for block in blocks:
        for name, module in block.named_modules():
            if type(module) is torch.nn.Linear and (not names or name.split(".")[-1] in names):
                layers.append(module)
    if not layers:
        return 0
    model.requires_grad_(False)
    for layer in layers:
        kw = dict(bias=False, device=layer.weight.device, dtype=layer.weight.dtype)
        layer.__class__ = LoRALinear
        layer.scale = alpha / r
        layer.lora_dropout = torch.nn.Dropout(dropout)
        layer.lora_A = torch.nn.Linear(layer.in_features, r, **kw)
        layer.lora_B = torch.nn.Linear(r, layer.out_features, **kw)
        torch.nn.init.zeros_(layer.lora_B.weight)
    return len(layers)


def load_adapter(model, directory):
    """The adapters saved by save_adapter into `directory` (a checkpoint's adapter/), into the model's."""
    adapter = safetensors.torch.load_file(os.path.join(directory, "adapter_model.safetensors"))
    model.load_state_dict({name.removeprefix("base_model.model."): w for name, w in adapter.items()}, strict=False)


class AdaptersOff(torch.nn.Module):
    """The reference under --use_peft: the policy, adapters off, in eval mode (no second copy)."""

    def __init__(self, policy):
        super().__init__()
        self.module = policy
        self.config = policy.config

    def forward(self, **kwargs):
        was_training = self.module.training
        LoRALinear.on = False
        try:
            return self.module.eval()(**kwargs)
        finally:
            LoRALinear.on = True
            self.module.train(was_training)


def save_adapter(tensors, directory, base_model, r, alpha, dropout):
    """The adapters of a state dict into `directory` in peft's layout; returns the base model's state dict."""
    adapter = {"base_model.model." + k: v.contiguous() for k, v in tensors.items() if ".lora_" in k}
    os.makedirs(directory)
    safetensors.torch.save_file(adapter, os.path.join(directory, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
              "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted({k.split(".")[-3] for k in adapter})}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {k: v for k, v in tensors.items() if ".lora_" not in k}


@contextlib.contextmanager
def merged(base, tensors, scale):
    """The base weights of `base` (a state dict) with W + scale B A while in the block, the adapters from `tensors`:
    in place, so that there is no second copy of the weights (7B: 28 GB in fp32); then back, to float rounding."""
    layers = [(base[k.replace("lora_A.", "")], tensors[k.replace("_A", "_B")], tensors[k])
              for k in tensors if k.endswith("lora_A.weight")]
    for w, b, a in layers:
        w.addmm_(b, a, alpha=scale)
    try:
        yield
    finally:  # the reference needs the base weights
        for w, b, a in layers:
            w.addmm_(b, a, alpha=-scale)
