"""Every dtype cast of a piece of torch code, counted by where it comes from.

bf16 training spends a visible share of a step copying tensors between float32 and bfloat16; the
profiler says how long `aten::_to_copy` takes, not who asked for it (and torch 2.13's profiler with
verbose stacks crashes decoding our step's stacks). This dispatch mode sees every operator: a
dtype-changing `_to_copy`, `copy_` or `_foreach_copy_` outside the backward pass is keyed by the innermost frame in the
code we care about (ours, transformers, torch.optim, accelerate), one in the backward pass by the
autograd node that runs it (e.g. `ToCopyBackward0`, the backward of a forward cast).
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KEEP = ("/stages/", "transformers/", "torch/optim", "torch/nn/utils", "accelerate/")
_CASTS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
_FOREACH_COPY = torch.ops.aten._foreach_copy_.default


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/stages/", "/benchmarks/", "/tests/"):
        if marker in filename:
            head = "" if marker == "site-packages/" else marker.strip("/") + "/"
            return head + filename.split(marker, 1)[1]
    return filename


class CastCounter(TorchDispatchMode):
    """`with CastCounter(keep) as c: ...`, then `c.table()`: casts and megabytes moved (read + written)
    per source and direction, largest first."""

    def __init__(self, keep: tuple[str, ...] = KEEP):
        super().__init__()
        self.keep = keep
        self.count: Counter = Counter()
        self.megabytes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _CASTS:
            src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype != out.dtype:
                self._record(src, out)
        elif func is _FOREACH_COPY:  # (destinations, sources): e.g. float32 masters copied into bf16 weights
            for dst, src in zip(args[0], args[1]):
                if src.dtype != dst.dtype:
                    self._record(src, dst)
        return out

    def _record(self, src: torch.Tensor, out: torch.Tensor) -> None:
        node = torch._C._current_autograd_node()
        if node is not None:
            where = "backward " + node.name()
        else:
            frames = [f for f in traceback.extract_stack()[:-2] if any(k in f.filename for k in self.keep)]
            where = f"forward {_short(frames[-1].filename)}:{frames[-1].lineno} {frames[-1].name}" if frames else "forward ?"
        key = f"{where} {str(src.dtype).removeprefix('torch.')}->{str(out.dtype).removeprefix('torch.')}"
        self.count[key] += 1
        self.megabytes[key] += out.numel() * (src.element_size() + out.element_size()) / 1e6

    def table(self, top: int = 40) -> list[dict]:
        return [{"source": k, "casts": self.count[k], "mb": round(mb, 3)} for k, mb in self.megabytes.most_common(top)]
