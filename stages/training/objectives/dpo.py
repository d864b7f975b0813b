"""DPO (Rafailov et al., 2023) and its family: sigmoid (+ label smoothing = conservative DPO), IPO,
hinge, reference-free."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from stages.training import losses as L
from stages.training.objectives.base import Objective, column
from stages.pipeline.sections import Section


class DPO(Objective):
    """Widening the policy's log-ratio margin over the reference's between chosen and rejected
    raises the chosen's likelihood without a reward model or sampling."""

    name = "dpo"
    needs = ("prompt", "generation1", "generation2")
    reference_columns = ("reference_logp1", "reference_logp2")

    class Options(Section):
        # sigmoid: DPO (Rafailov et al., 2023); ipo: IPO (Azar et al., 2023); hinge: SLiC-style.
        loss: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", validation_alias="loss_type")
        beta: float = Field(0.1, gt=0)  # the strength of the KL constraint (IPO: its regulariser tau)
        label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # > 0: conservative DPO (sigmoid only)
        # Average log-probs over completion tokens instead of summing. The reference DPO code sums;
        # TRL's and HALOs' IPO average. Off by default, on is the usual choice for IPO.
        length_normalize: bool = False
        reference_free: bool = False  # compare with a uniform reference (ref log-probs = 0)

    def uses_reference(self):
        return not self.opt.reference_free

    def collate(self, rows, tokenizer):
        out = self.pair_batch(rows, tokenizer)
        if all(r.get("reference_logp1") is not None and r.get("reference_logp2") is not None for r in rows):
            out["ref_logps"] = torch.cat([column(rows, "reference_logp1"), column(rows, "reference_logp2")])
        return out

    def per_example_loss(self, model, batch):
        # The reference goes first: its transient buffers are gone before the policy's activations pile up.
        ref = None if self.opt.reference_free else self.reference_logps(batch, "ref_logps")
        pi, n = self.seq_logps(model, batch)
        ref = torch.zeros_like(pi) if ref is None else ref.to(pi.dtype)
        if self.opt.length_normalize:
            pi, ref = pi / n.clamp(min=1), ref / n.clamp(min=1)
        pi_c, pi_r = pi.chunk(2)
        ref_c, ref_r = ref.chunk(2)
        losses, rc, rr = L.dpo_loss(pi_c, pi_r, ref_c, ref_r, self.opt.beta, self.opt.loss, self.opt.label_smoothing)
        return losses, {"rewards_chosen": rc, "rewards_rejected": rr, "reward_margin": rc - rr,
                        "reward_accuracy": (rc > rr).float(), "tokens": n.view(2, -1).sum(0)}
