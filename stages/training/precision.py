"""Training precision: float32, or bfloat16 compute with float32 master weights.

    resolve("auto")        "bf16" where the device runs bfloat16 natively (CUDA with bf16 support,
                           CPUs with AVX512-BF16 or AMX), else "no" (float32); the one rule the
                           trainer, the reference stage and the sampler share
    MasterWeights(model)   bf16 mode: the model's parameters become bfloat16 (every matmul,
                           activation and gradient is bf16: half the bytes, and on AMX about 4x the
                           matmul rate); float32 copies of the trainable ones ("masters") are what
                           the optimizer updates, its moments float32 too
    cast_for_compute(m)    a model that is only run (the resident reference, the reference stage):
                           its parameters in bf16 and, on CPU, the attention below

Why master weights: a bf16 weight resolves about 3 significant digits (2^-8 relative), so an
AdamW update of lr 5e-6 on a weight of 0.02 (2.5e-4 relative) rounds to nothing in pure bf16 and
training silently stalls. The masters keep every update; the bf16 copy the model runs on is the
masters rounded after each step. Gradients arrive in bf16; a step's micro-batches are summed in
bf16 on the model (train.grad_sum_dtype: bfloat16, the default: one float32 copy after the last
backward pass, when the activations are gone) or into the float32 masters as backward forms them
(float32: exact sums, a float32 set of gradients during the last backward pass); they are clipped
and applied in float32.

Why not autocast over float32 weights (accelerate's `mixed_precision="bf16"`): it re-casts every
weight at every use, keeps the residual stream, norms and the elementwise ops of the backward pass in
float32, and turned the lean layers off; on SmolLM2 it trained at 221 tokens/s where bf16 weights
ran 247 and float32 148 (8 x 96 tokens, Xeon with AMX, benchmarks/bench_train.py has today's figures).

Attention on CPU: PyTorch's CPU flash-attention kernel is about 2.5x slower in bf16 than in float32
(fwd+bwd of [8, 9 heads, 96, 64]: 19.5 ms vs 7.6 ms a layer), so under bf16 on CPU the attention
runs as sdpa on float32 copies of q, k, v (`sdpa_fp32`), its output cast back: the matmuls around
it stay bf16. On CUDA sdpa's bf16 kernels are the fast ones and stay.

Sharded training (FSDP, DeepSpeed) keeps its own mixed-precision machinery: there the choice goes to
accelerate (`accelerator_precision`).
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("no", "bf16")
FP32_ATTENTION = "sdpa_fp32"


def bf16_native(device_type: str | None = None) -> bool:
    """Whether bfloat16 runs natively here: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX
    (oneDNN's check). Emulated bf16 is slower than float32."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve(choice: str | None, device_type: str | None = None) -> str:
    """train.mixed_precision / reference.mixed_precision resolved on this machine: "no" or "bf16"
    (None, a section not filled from train, is auto)."""
    if choice in ("auto", None):
        return "bf16" if bf16_native(device_type) else "no"
    if choice not in MODES:
        raise ValueError(f"mixed precision {choice!r}: expected auto, no or bf16")
    return choice


def _sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_ATTENTION, _sdpa_fp32)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)  # sdpa's mask format


def _set_attention(model: nn.Module, implementation: str) -> str | None:
    """Switch a transformers model's attention; returns the previous implementation (None: not one)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return None
    before = config._attn_implementation
    if before != "sdpa" and implementation == FP32_ATTENTION:
        return None  # eager or a custom kernel the user chose: leave it
    _register_attention()
    config._attn_implementation = implementation  # read by every attention layer at each call
    for sub in model.modules():  # nested configs (a PEFT wrapper's base model shares this one)
        cfg = getattr(sub, "config", None)
        if cfg is not None and cfg is not config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = implementation
    return before


def _cast_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters only: buffers (RoPE's inverse frequencies) keep their float32 values. Tied weights
    are one Parameter, so they stay tied."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _to_bf16(model: nn.Module) -> str | None:
    """bf16 parameters and, on CPU, float32 attention; returns the attention to restore (None: unchanged)."""
    _cast_params(model, torch.bfloat16)
    if next(model.parameters()).device.type == "cpu":
        return _set_attention(model, FP32_ATTENTION)
    return None


def cast_for_compute(model: nn.Module, mode: str) -> nn.Module:
    """A model that is only run forward (no optimizer), computing in `mode`'s precision."""
    if mode == "bf16":
        _to_bf16(model)
    return model


class MasterWeights:
    """bf16 parameters for compute, float32 masters for the optimizer (see the module docstring).

    `fold_in_backward=False` (train.grad_sum_dtype: bfloat16, and DDP): autograd sums a step's bf16
    gradients on the model; `accumulate()` after its last backward pass turns them into the masters'
    float32 ones, one parameter at a time, when the activations are gone: a lower peak and less
    wall than the float32 sums below (docs/benchmarks.md), at one bf16 rounding per micro-batch.

    `fold_in_backward=True` (float32 sums): gradients are summed in float32 without a float32 set
    of them existing while activations do, where they can be avoided: a step's first micro-batch
    leaves its bf16 gradients as they are (0.27 GB for SmolLM2, where float32 would take 0.54 GB during the next micro-batch's forward
    pass, the peak of memory); from the next backward pass on, each gradient is added into its
    master's float32 .grad as soon as backward has formed it (a post-accumulate-grad hook), the
    held bf16 one with it, and freed there. `accumulate()` after the step's backward passes folds
    what is left (a single micro-batch's gradients: after its activations are gone; a parameter
    that got no gradient gets zeros, as a float32 model's would). Under DDP the bf16 gradients are
    summed on the model and all-reduced there, then folded. Usage per
    optimizer step: `accumulate()`; then clip / step on `params`, `to_model()`, and the optimizer's
    zero_grad(set_to_none=True): the float32 gradients then do not exist during the next step's
    first micro-batch either.
    `restore()` at the end (or leaving a `with masters:` block, an error included) puts the
    masters back into the model as float32 parameters; frozen parameters (a LoRA base) stay the
    bf16-rounded values they were trained against, upcast.
    """

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter], fold_in_backward: bool = True):
        self.model = model
        self.compute = trainable
        # Copied before the cast: the masters start from the exact float32 weights.
        self.params = [nn.Parameter(p.detach().float().clone()) for p in trainable]
        self._attention = _to_bf16(model)
        # Off under DDP: its all-reduce reads the model's gradients after the step's last backward.
        self._held: dict[int, torch.Tensor] = {}  # id(param) -> its bf16 gradient of the step's first micro-batch
        self._hooks = [p.register_post_accumulate_grad_hook(self._folder(m)) for p, m in zip(trainable, self.params)
                       ] if fold_in_backward else []

    def _folder(self, master: nn.Parameter):
        @torch.no_grad()
        def fold(p: torch.Tensor, hold: bool = True) -> None:
            held = self._held.pop(id(p), None)
            if master.grad is None and held is None and hold:
                self._held[id(p)] = p.grad  # the step's first gradient: kept in bf16 until a second comes
            elif master.grad is None:
                master.grad = p.grad.float() if held is None else held.float().add_(p.grad)
            else:
                master.grad.add_(p.grad)  # bf16 into float32: promoted elementwise, no float32 copy
            p.grad = None
        return fold

    @torch.no_grad()
    def accumulate(self) -> None:
        for m, p in zip(self.params, self.compute):
            if p.grad is not None:  # formed outside a backward pass's hooks
                self._folder(m)(p, hold=False)
            held = self._held.pop(id(p), None)
            if held is not None:
                m.grad = held.float()
            if m.grad is None:
                m.grad = torch.zeros_like(m)

    @torch.no_grad()
    def to_model(self) -> None:
        torch._foreach_copy_(self.compute, self.params)  # rounds to bf16

    def state_dict(self, names: dict[int, str]) -> dict[str, torch.Tensor]:
        """The masters keyed by their parameters' names (`names`: id(param) -> name)."""
        return {names[id(p)]: m.detach() for p, m in zip(self.compute, self.params)}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], names: dict[int, str]) -> None:
        for p, m in zip(self.compute, self.params):
            m.copy_(tensors[names[id(p)]])
        self.to_model()

    def __enter__(self) -> "MasterWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        self._held.clear()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for p, m in zip(self.compute, self.params):
            p.data = m.detach()
        _cast_params(self.model, torch.float32)  # the frozen ones: the trained ones are float32 already
        if self._attention is not None:
            _set_attention(self.model, self._attention)
