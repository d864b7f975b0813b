"""ORPO (Hong et al., 2024): SFT on the chosen completion plus an odds-ratio preference term,
no reference model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from stages.training.objectives.base import Objective
from stages.pipeline.sections import Section


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) with p = exp(mean token log-prob); p is kept just below 1 so that a
    completion the model is certain of stays finite."""
    m = mean_logp.clamp(max=-1e-7)
    return m - torch.log(-torch.expm1(m))


def orpo_loss(mean_c: torch.Tensor, mean_r: torch.Tensor, weight: float):
    """-mean_c + weight * -log sigmoid(log odds_c - log odds_r) per pair (mean = mean token
    log-prob); also the log odds ratio."""
    ratio = log_odds(mean_c) - log_odds(mean_r)
    return -mean_c - weight * F.logsigmoid(ratio), ratio.detach()


class ORPO(Objective):
    """The NLL term teaches the chosen answers; the odds-ratio term, a mild penalty, makes the
    rejected ones less likely relative to them, in one stage and without a reference."""

    name = "orpo"
    needs = ("prompt", "generation1", "generation2")

    class Options(Section):
        beta: float = Field(0.1, gt=0)  # lambda in the paper (TRL's name and default)

    def collate(self, rows, tokenizer):
        return self.pair_batch(rows, tokenizer)

    def per_example_loss(self, model, batch):
        logp, n = self.seq_logps(model, batch)
        mean_c, mean_r = (logp / n.clamp(min=1)).chunk(2)
        losses, ratio = orpo_loss(mean_c, mean_r, self.opt.beta)
        return losses, {"nll": -mean_c.detach(), "log_odds_ratio": ratio, "reward_accuracy": (ratio > 0).float(),
                        "tokens": n.view(2, -1).sum(0)}
