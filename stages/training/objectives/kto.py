"""KTO (Ethayarajh et al., 2024): pointwise desirable / undesirable labels, no pairs needed."""

from __future__ import annotations

import torch
from pydantic import Field

from stages.training.distributed_ops import batch_mean
from stages.training import losses as L
from stages.training.objectives.base import Objective, column
from stages.pipeline.sections import Section


class KTO(Objective):
    """A prospect-theory value of the log-ratio against a reference point z0 (a batch-free estimate
    of the policy's KL to the reference, from mismatched prompt/completion pairs).

    Each record carries its own mismatched completion (`kl_generation`, another record's
    generation1, assigned by build_pool), so z0 needs no second example in the batch: batch size 1
    works, and the mismatch pairing is fixed, which lets the reference stage cache its log-probs.
    """

    name = "kto"
    needs = ("prompt", "generation1", "desirable", "kl_generation")
    reference_columns = ("reference_logp1", "reference_kl_logp")

    class Options(Section):
        beta: float = Field(0.1, gt=0)  # the scale of the implied reward (KL strength)
        desirable_weight: float = Field(1.0, gt=0)  # lambda_D
        undesirable_weight: float = Field(1.0, gt=0)  # lambda_U; keep lambda_D n_D / (lambda_U n_U) in [1, 4/3]

    def collate(self, rows, tokenizer):
        out = self.seqs(tokenizer, rows, ["generation1", "kl_generation"], share_prompt=True)
        out["weights"] = column(rows, "generation1_weight", default=1.0)
        out["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows])
        if all(r.get("reference_logp1") is not None and r.get("reference_kl_logp") is not None for r in rows):
            out["ref_logps"] = torch.cat([column(rows, "reference_logp1"), column(rows, "reference_kl_logp")])
        return out

    def per_example_loss(self, model, batch):
        ref = self.reference_logps(batch, "ref_logps")  # first: see DPO
        pi, n = self.seq_logps(model, batch)
        ref = ref.to(pi.dtype)
        pi_y, pi_kl = pi.chunk(2)
        ref_y, ref_kl = ref.chunk(2)
        losses, rewards, z0 = L.kto_loss(pi_y, ref_y, batch["desirable"], pi_kl, ref_kl, self.opt.beta,
                                         self.opt.desirable_weight, self.opt.undesirable_weight, mean=batch_mean)
        d = batch["desirable"].float()
        return losses, {"rewards": rewards, "kl_z0": z0.expand_as(rewards), "desirable_fraction": d,
                        "tokens": n.chunk(2)[0]}
