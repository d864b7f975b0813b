"""Collectives of data-parallel training (torch.distributed) beyond the gradients' (DDP and FSDP
reduce those): statistics over the whole batch when it is sharded across the processes.

An objective whose loss uses a statistic of the batch (KTO's reference point z0) takes it through
`batch_mean`, so that under DDP every process uses the statistic of the global micro-batch, as one
process would. A process left without rows in a micro-batch computes stand-in rows at weight 0
(trainer.fit) inside `idle()`: they count for nothing here either.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

_idle = contextvars.ContextVar("align_idle_shard", default=False)


@contextlib.contextmanager
def idle(flag: bool = True) -> Iterator[None]:
    token = _idle.set(flag)
    try:
        yield
    finally:
        _idle.reset(token)


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over every process's rows of this micro-batch (detached when sharded)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.mean()
    scale = 0.0 if _idle.get() else 1.0
    both = torch.stack([x.detach().sum() * scale, torch.tensor(x.numel() * scale, dtype=x.dtype, device=x.device)])
    dist.all_reduce(both)
    return both[0] / both[1].clamp(min=1.0)

