"""Memory-lean training layers for Llama-style decoders: the same numbers, fewer saved activations.

Autograd keeps every intermediate a layer's backward pass might read. Two blocks of a Llama-style
decoder keep more than they must:
- the SwiGLU MLP, down(silu(gate(x)) * up(x)), keeps gate(x), up(x), silu(gate(x)) and the product.
  Recomputing the last two from the first two in the backward pass (elementwise, cheap) drops two
  of its four intermediate-width tensors: a quarter of all activation memory at SmolLM2's shapes.
- RMSNorm keeps its input and the normalised input; keeping the input and 1/rms per position and
  recomputing the rest drops one hidden-width tensor per norm.
- attention with grouped key/value heads: transformers copies each KV head to its query heads
  (`repeat_kv`) before sdpa, and autograd keeps the copies. On CPU, sdpa's own GQA gives the same
  numbers without them; `native_gqa()` turns that on through transformers' switch while training.
`make_lean(model)` gives matching modules a subclass of their own class whose `forward` is the
lean one (a class, not an instance attribute: transformers with the `kernels` package re-kernelizes
its layers at every `model.train()`, which deletes an instance's `forward` and silently undid the
norms). Weights are untouched, so state dicts, saving and LoRA merging are unaffected. Modules that
differ from the expected structure are left alone: a LoRA-wrapped or biased projection, another
activation, another norm formula. Under autocast the original forward runs, since its dtype rules
are autocast's to apply.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Norms computing weight * (x / sqrt(mean(x^2) + eps)) in float32, cast back to x's dtype.
RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
# MLPs computing down_proj(act_fn(gate_proj(x)) * up_proj(x)).
SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


class SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up), saving only gate, up and the down weight."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad_out):
        # Five elementwise passes: silu, silu * up, grad_h * silu, grad_h * up and aten's fused
        # silu_backward (grad * d silu / d gate), where the formula written out takes ten; on CPU
        # in bf16 each pass over [tokens, intermediate] costs about as much as a small matmul.
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)
        grad_h = grad_out @ weight
        grad_w = None
        if ctx.needs_input_grad[2]:
            h = (silu * up).reshape(-1, up.shape[-1])
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ h
        grad_up = grad_h * silu
        grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate)
        return grad_gate, grad_up, grad_w


class RMSNormLean(torch.autograd.Function):
    """weight * (x * rstd), rstd = 1/sqrt(mean(x^2) + eps) in float32, saving x and rstd only."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out * n.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        gn = (grad_out * weight).float()
        grad_x = rstd * (gn - n * (gn * n).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


def _autocasting(t: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(t.device.type)


def _mlp_forward(self, x):
    return SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)


def _norm_forward(self, x):
    return RMSNormLean.apply(x, self.weight, self.variance_epsilon)


_LEAN_CLASSES: dict[type, type] = {}


def _lean_class(cls: type, lean) -> type:
    """`cls` with `lean` as its forward, the original's under autocast; one subclass per class, of
    the same name (what make_lean and transformers' kernel mapping look up)."""
    if getattr(cls, "_lean_of", None) is not None:
        return cls

    def forward(self, x):
        return cls.forward(self, x) if _autocasting(x) else lean(self, x)

    return _LEAN_CLASSES.setdefault(cls, type(cls.__name__, (cls,), {"forward": forward, "_lean_of": cls,
                                                                       "__module__": cls.__module__}))


def _is_silu(act) -> bool:
    # transformers wraps SiLU in its own class (SiLUActivation), not nn.SiLU
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear and m.bias is None


def make_lean(model: nn.Module) -> dict[str, int]:
    """Swap matching modules' forward for the lean one; returns how many of each were swapped."""
    counts = {"mlp": 0, "norm": 0}
    for module in model.modules():
        name = type(module).__name__
        if (name in SWIGLU_MLPS and all(_plain_linear(getattr(module, p, None)) for p in ("gate_proj", "up_proj", "down_proj"))
                and _is_silu(getattr(module, "act_fn", None))):
            module.__class__ = _lean_class(type(module), _mlp_forward)
            counts["mlp"] += 1
        elif name in RMS_NORMS and hasattr(module, "variance_epsilon") and getattr(module, "bias", None) is None:
            module.__class__ = _lean_class(type(module), _norm_forward)
            counts["norm"] += 1
    return counts


@contextmanager
def native_gqa(enabled: bool = True):
    """Let transformers hand grouped KV heads to sdpa unexpanded (its TRANSFORMERS_SDPA_FORCE_GQA
    switch, read at every call) for the duration; the previous value is restored afterwards.
    CPU only: with a padding mask, CUDA's sdpa would fall back to its slow math kernel."""
    if not enabled:
        yield
        return
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
