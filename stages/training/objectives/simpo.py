"""SimPO (Meng et al., 2024): reference-free preference optimisation on length-normalised
log-probs with a target reward margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from stages.training.objectives.base import Objective
from stages.pipeline.sections import Section


def simpo_loss(avg_c: torch.Tensor, avg_r: torch.Tensor, beta: float, gamma: float):
    """-log sigmoid(beta (avg_c - avg_r) - gamma) per pair, with avg = mean token log-prob of a
    completion; also the implicit rewards beta * avg."""
    return -F.logsigmoid(beta * (avg_c - avg_r) - gamma), beta * avg_c.detach(), beta * avg_r.detach()


class SimPO(Objective):
    """The implicit reward is the policy's own mean token log-prob (the quantity generation ranks
    by), so no reference model is needed; the margin gamma asks the chosen to win by a clear gap."""

    name = "simpo"
    needs = ("prompt", "generation1", "generation2")

    class Options(Section):
        # The paper's recommended starting point: beta 2.0 with gamma / beta = 0.5 (gamma 1.0).
        beta: float = Field(2.0, gt=0)
        gamma: float = Field(1.0, ge=0)  # the target reward margin between chosen and rejected

    def collate(self, rows, tokenizer):
        return self.pair_batch(rows, tokenizer)

    def per_example_loss(self, model, batch):
        logp, n = self.seq_logps(model, batch)
        avg_c, avg_r = (logp / n.clamp(min=1)).chunk(2)
        losses, rc, rr = simpo_loss(avg_c, avg_r, self.opt.beta, self.opt.gamma)
        return losses, {"rewards_chosen": rc, "rewards_rejected": rr, "reward_margin": rc - rr,
                        "reward_accuracy": (rc > rr).float(), "tokens": n.view(2, -1).sum(0)}
