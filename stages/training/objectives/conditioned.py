"""The conditioned-NLL family (Quark, NLF): training on samples whose prompt carries a description
of their quality. Not an objective itself; quark.py and nlf.py say what the condition is."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from stages.training import losses as L
from stages.training.logprobs import completion_token_stats
from stages.data.tokens import of_record
from stages.training.objectives.base import Objective, batch_token_logps, column, sequences, token_grid
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
    # Weight of a pairwise contrast between two samples of one prompt under different conditions
    # (a record and its partner from build_pool: generation2 under control2 / feedback2): each
    # sample likelier under its own condition than under the other's, against the other sample:
    # -log sigmoid(log p(y1 | c1) + log p(y2 | c2) - log p(y1 | c2) - log p(y2 | c1)). It trains
    # what the held-out probe measures: each sample's own words cancel between the two conditions
    # and the prompt's shared ones between the two samples, so what is left is what the conditions
    # tell apart, which memorising a sample cannot satisfy. Three more sequences per record. 0: off.
    pair_contrast_coef: float = Field(0.0, ge=0)


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
        if self.opt.pair_contrast_coef > 0:
            out.update(self.partner_batch(rows, tokenizer))
        return out

    def partner_batch(self, rows, tokenizer) -> dict:
        """pair_contrast_coef's sequences, as `pair_*`, for the rows with a partner under another
        condition (`pair_index`): each such row's sample under its partner's condition, then the
        partner's sample under the row's condition, then under its own. Rows without one cost
        nothing and take no part in the contrast."""
        own_key, other_key = self.condition_key, f"{self.condition_key}2"
        index = [i for i, r in enumerate(rows) if r.get("generation2") is not None
                 and r.get(other_key) not in (None, r[own_key])]
        out = {"pair_index": torch.tensor(index, dtype=torch.long)}
        if not index:
            return out
        rows = [rows[i] for i in index]
        own = [self.condition_prefix(r[own_key], tokenizer) for r in rows]
        other = [self.condition_prefix(r[other_key], tokenizer) for r in rows]
        seqs = ([of_record(tokenizer, r, "generation1", c) for r, c in zip(rows, other)]
                + [of_record(tokenizer, r, "generation2", c) for r, c in zip(rows, own)]
                + [of_record(tokenizer, r, "generation2", c) for r, c in zip(rows, other)])
        batch = sequences(seqs, tokenizer.pad_token_id, self.max_prompt, self.cfg.max_length)
        return out | {f"pair_{k}": v for k, v in batch.items()}

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
        if self.opt.pair_contrast_coef > 0:
            index = batch["pair_index"]
            has = torch.zeros_like(loss, dtype=torch.bool).index_fill_(0, index, True)
            margins = torch.zeros_like(loss)
            if len(index):
                pair = {k[5:]: v for k, v in batch.items() if k.startswith("pair_") and k != "pair_index"}
                pair_logp, pair_mask = batch_token_logps(model, pair, self.vocab)
                y1_c2, y2_c1, y2_c2 = (pair_logp * pair_mask).sum(-1).chunk(3)
                y1_c1 = (logp * mask).sum(-1)[index]
                margin = (y1_c1 + y2_c2) - (y1_c2 + y2_c1)
                contrast = L.condition_contrast(margin, torch.zeros_like(margin))
                loss = loss + self.opt.pair_contrast_coef * torch.zeros_like(loss).index_add(0, index, contrast)
                # Rows without a partner log the mean of those with one: the step's margin is theirs alone.
                margins = torch.full_like(loss, float(margin.detach().mean())).index_copy(0, index, margin.detach())
            metrics["pair_margin"] = margins.detach()
            metrics["pair_rows"] = has.float()  # the share of rows that took part in the contrast
        return loss, metrics
