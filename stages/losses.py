"""Losses as pure functions of tensors that return per-example values.

The trainer multiplies each example's loss by its weight and divides by the batch's weight sum
(`weighted_mean`), so a weight of 0 removes an example exactly. Conventions (DESIGN.md): a
sequence log-prob is the sum over completion tokens, prompt tokens masked, computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(label_t | <t) per position, zero where mask is 0. logits [B,T,V] already aligned to labels [B,T]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # upcast bf16/fp16, keep float64
    logp = -F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    return logp * mask


def sft_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Completion-only negative log-likelihood, averaged over each example's completion tokens."""
    return -token_logps.sum(-1) / mask.sum(-1).clamp(min=1)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Reward-model loss -log sigmoid(s_c - s_r - margin) per pair."""
    return -F.logsigmoid(chosen - rejected - margin)


def weighted_mean(per_example: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * loss) / sum(w); an all-zero-weight batch contributes 0 (not NaN)."""
    weights = weights.to(per_example.dtype)
    return (per_example * weights).sum() / weights.sum().clamp(min=torch.finfo(per_example.dtype).tiny)
