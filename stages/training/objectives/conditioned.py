"""The conditioned-NLL family (Quark, NLF): training on samples whose prompt carries a description
of their quality. Not an objective itself; quark.py and nlf.py say what the condition is."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from stages.training import losses as L
from stages.training.logprobs import completion_token_stats
from stages.training.objectives.base import Objective, batch_token_logps, column, token_grid
from stages.pipeline.sections import Section


class ConditionedOptions(Section):
    kl_coef: float = Field(0.05, ge=0)  # weight of the per-token KL to the reference (Quark's beta)
    entropy_coef: float = Field(0.06, ge=0)  # weight of the entropy bonus (subtracted from the loss)
    # exact: full-vocabulary KL from the reference model's logits (reference resident, as in the
    # Quark and NLF papers); cached: an estimate from the reference stage's per-token log-probs of
    # the pool's tokens (no second model; approximate, since the pool was sampled by an older policy).
    kl: Literal["exact", "cached"] = "exact"
    # ref_policy = KL(reference || policy), the papers' direction; policy_ref = KL(policy || reference).
    kl_direction: Literal["ref_policy", "policy_ref"] = "ref_policy"
    # Weight of GeDi's discriminative loss (Krause et al., 2020) added to the papers' objective:
    # each sample's summed log-likelihood under its own condition against under another row's,
    # -log sigmoid(log p(y | own) - log p(y | other)). On the policy's own samples the NLL's
    # gradient is mostly noise the conditions share; this term keeps what tells them apart. One
    # more forward and backward pass per batch. 0: off (the papers' Quark and NLF).
    contrast_coef: float = Field(0.0, ge=0)


def other_conditions(conditions: list[str]) -> list[str | None]:
    """For each row, the condition of the next row (cyclically) whose condition differs; None when
    every row of the batch has the same one."""
    n = len(conditions)
    return [next((conditions[(i + k) % n] for k in range(1, n) if conditions[(i + k) % n] != c), None)
            for i, c in enumerate(conditions)]


class ConditionedNLL(Objective):
    """NLL of the generation given a conditioned prompt, plus kl_coef * per-token KL to the
    reference (which sees the unconditioned prompt), minus entropy_coef * entropy. Conditioning on
    a reward token or on feedback teaches the model what each level of quality looks like; at
    sampling time one conditions on the best."""

    needs = ("prompt", "generation1")
    reference_columns = ("reference_token_logps1",)
    Options = ConditionedOptions
    vocab: int | None = None  # the policy predicts token ids below this (None: all); Quark sets it

    condition_key: ClassVar[str]  # the record column that holds a sample's condition

    def condition_prefix(self, condition: str, tokenizer) -> tuple[int, ...]:
        """The token ids a condition puts before the prompt (they count toward max_prompt_length)."""
        raise NotImplementedError

    def prefix(self, row, tokenizer) -> tuple[int, ...]:
        return self.condition_prefix(row[self.condition_key], tokenizer)

    def uses_reference(self):
        return self.opt.kl_coef > 0

    def needs_reference_logits(self):
        return self.opt.kl == "exact"

    def collate(self, rows, tokenizer):
        out = self.seqs(tokenizer, rows, ["generation1"], [self.prefix(r, tokenizer) for r in rows])
        # The reference sees the unconditioned prompt; the completion tokens are the same.
        out.update({f"ref_{k}": v for k, v in self.seqs(tokenizer, rows, ["generation1"]).items()})
        out["weights"] = column(rows, "generation1_weight", default=1.0)
        cached = token_grid(out, rows, "reference_token_logps1") if self.opt.kl == "cached" else None
        if cached is not None:
            out["ref_token_logps"] = cached
        if self.opt.contrast_coef > 0:
            other = other_conditions([r[self.condition_key] for r in rows])
            alt = self.seqs(tokenizer, rows, ["generation1"],
                            [self.condition_prefix(o if o is not None else r[self.condition_key], tokenizer)
                             for r, o in zip(rows, other)])
            out.update({f"alt_{k}": v for k, v in alt.items()})
            out["alt_valid"] = torch.tensor([o is not None for o in other], dtype=torch.float32)
        return out

    def per_example_loss(self, model, batch):
        ref_batch = {k[4:]: v for k, v in batch.items() if k.startswith("ref_") and k != "ref_token_logps"}
        exact = self.opt.kl == "exact" and self.opt.kl_coef > 0
        logp, kl, ent, mask = completion_token_stats(model, batch, self.ref_model if exact else None, ref_batch,
                                                     self.opt.kl_direction, self.vocab)
        if self.opt.kl == "cached" and self.opt.kl_coef > 0:
            if "ref_token_logps" not in batch:
                raise RuntimeError(f"{self.name}: kl 'cached' needs the reference stage's per-token log-probs")
            kl = L.sampled_kl(logp, batch["ref_token_logps"], self.opt.kl_direction) * mask
        loss = L.conditioned_nll(logp, kl, ent, mask, self.opt.kl_coef, self.opt.entropy_coef)
        n = mask.sum(-1).clamp(min=1)
        metrics = {"kl": (kl * mask).sum(-1) / n, "entropy": (ent * mask).sum(-1) / n, "tokens": mask.sum(-1)}
        if self.opt.contrast_coef > 0:
            alt = {k[4:]: v for k, v in batch.items() if k.startswith("alt_") and k != "alt_valid"}
            alt_logp, alt_mask = batch_token_logps(model, alt, self.vocab)
            own, other = (logp * mask).sum(-1), (alt_logp * alt_mask).sum(-1)
            loss = loss + self.opt.contrast_coef * L.condition_contrast(own, other) * batch["alt_valid"]
            metrics["contrast_margin"] = (own - other).detach()
        return loss, metrics
