"""Online RL: REINFORCE with a leave-one-out baseline (RLOO, Ahmadian et al., 2024)."""

from __future__ import annotations

import torch
from pydantic import Field

from stages.training import losses as L
from stages.training.objectives.base import Objective, column
from stages.pipeline.sections import Section


class RLOO(Objective):
    """Each of a prompt's n samples is pushed up or down by its reward minus the mean reward of the
    others (an unbiased, critic-free baseline), with a KL penalty to the reference folded into the
    reward. Batches hold whole prompt groups."""

    name = "rl"
    needs = ("prompt", "generation1", "generation1_reward")
    reference_columns = ("reference_logp1",)
    group_by = "prompt_id"

    class Options(Section):
        kl_coef: float = Field(0.05, ge=0)  # reward - kl_coef * (log pi - log ref), per sequence

    def uses_reference(self):
        return self.opt.kl_coef > 0

    def collate(self, rows, tokenizer):
        out = self.seqs(tokenizer, rows, ["generation1"], share_prompt=True)
        ids = {pid: i for i, pid in enumerate(dict.fromkeys(r["prompt_id"] for r in rows))}
        out["groups"] = torch.tensor([ids[r["prompt_id"]] for r in rows])
        out["rewards"] = column(rows, "generation1_reward")
        out["weights"] = column(rows, "generation1_weight", default=1.0)
        return self.add_cached(out, rows, {"ref_logps": "reference_logp1"})

    def per_example_loss(self, model, batch):
        ref = self.reference_logps(batch, "ref_logps") if self.opt.kl_coef > 0 else None  # first: see DPO
        logp, n = self.seq_logps(model, batch)
        ref = logp.detach() if ref is None else ref.to(logp.dtype)
        losses, adv = L.rloo_loss(logp, ref, batch["rewards"], batch["groups"], self.opt.kl_coef)
        return losses, {"advantage": adv, "reward": batch["rewards"], "kl": (logp - ref).detach(), "tokens": n}
