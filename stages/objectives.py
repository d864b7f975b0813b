"""Training objectives. Adding one is a subclass with `collate` and `per_example_loss`.

An objective turns records (rows of stages/schemas.RECORDS) into tensors, and a batch into
per-example losses plus per-example metrics. The trainer owns weights, reduction, optimisation and
checkpoints. Objectives that compare with a reference read its log-probs from the pool's cached
`reference_*` columns (the reference stage) or, when those are absent, from `self.ref_model`
(the reference model resident, or the LoRA policy with its adapters switched off).
"""

from __future__ import annotations

import torch

from stages import losses as L
from stages.logprobs import completion_token_logps, completion_token_stats, shared_prompt_token_logps
from stages.tokens import Sequence, feedback_prefix, for_classifier, join, of_record, pad, text_ids


def sequences(seqs: list[Sequence], pad_id: int, max_prompt: int, max_length: int, share_prompt: bool = False) -> dict:
    """A right-padded batch of sequences under the token rules (stages/tokens.py).

    With share_prompt, when some rows carry the same prompt tokens, the batch also holds them as
    unique prompts + one completion per row (`shared_*`, for logprobs.shared_prompt_token_logps).
    """
    enc = [join(s, max_prompt, max_length) for s in seqs]
    out = {"input_ids": pad([e[0] for e in enc], pad_id),
           "attention_mask": pad([[1] * len(e[0]) for e in enc], 0),
           "completion_mask": pad([e[1] for e in enc], 0)}
    if share_prompt:
        out |= shared_prompt_batch(enc, pad_id)
    return out


def shared_prompt_batch(enc: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """`join` outputs as unique prompts, the prompt of each row, and the rows'
    completions; {} when no prompt repeats, or a prompt or completion is empty."""
    split = [(ids[:len(ids) - sum(mask)], ids[len(ids) - sum(mask):]) for ids, mask in enc]
    if not all(p and c for p, c in split):
        return {}
    unique: dict[tuple[int, ...], int] = {}
    index = [unique.setdefault(tuple(p), len(unique)) for p, _ in split]
    if len(unique) == len(split):
        return {}
    prompts = [list(p) for p in unique]
    return {"shared_prompt_ids": pad(prompts, pad_id), "shared_prompt_mask": pad([[1] * len(p) for p in prompts], 0),
            "shared_prompt_index": torch.tensor(index),
            "shared_completion_ids": pad([c for _, c in split], pad_id),
            "shared_completion_mask": pad([[1] * len(c) for _, c in split], 0)}


def batch_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token completion log-probs of a `sequences` batch and their mask, one row per pair
    (through the shared prompts when the batch has them)."""
    if "shared_prompt_ids" in batch:
        return shared_prompt_token_logps(model, batch["shared_prompt_ids"], batch["shared_prompt_mask"],
                                         batch["shared_prompt_index"], batch["shared_completion_ids"],
                                         batch["shared_completion_mask"])
    return completion_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])


def column(rows, name, dtype=torch.float32, default=None):
    return torch.tensor([r.get(name, default) if r.get(name) is not None else default for r in rows], dtype=dtype)


class Objective:
    """Base: subclasses set `name`, the record columns they need, and implement the two methods."""

    name = "base"
    model_kind = "causal_lm"  # or "sequence_classifier"
    needs: tuple[str, ...] = ("prompt", "generation1")
    reference_columns: tuple[str, ...] = ()  # cached reference columns it can use instead of ref_model

    def __init__(self, cfg):
        self.cfg = cfg  # the train section
        self.opt = getattr(cfg, self.name, None)  # the objective's own sub-section (train.dpo, train.kto, ...)
        self.ref_model = None  # set by the trainer when the pool has no cached reference columns

    @property
    def max_prompt(self):
        return self.cfg.max_prompt_length

    def uses_reference(self) -> bool:
        return bool(self.reference_columns)

    def collate(self, rows: list[dict], tokenizer) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def per_example_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # -- helpers shared by objectives ----------------------------------------------------------------
    def seqs(self, tokenizer, rows: list[dict], generations: list[str], prefixes=None, share_prompt: bool = False):
        """The batch of each row's prompt with each of `generations` (all rows' first, then the
        next): recorded token ids where rows have them, else their tokenised text.
        share_prompt: rows repeat prompts (DPO, KTO, RL); run each prompt once where allowed."""
        share = share_prompt and self.cfg.share_prompt and not self.cfg.gradient_checkpointing
        seqs = [of_record(tokenizer, r, g, prefixes[i] if prefixes else ())
                for g in generations for i, r in enumerate(rows)]
        return sequences(seqs, tokenizer.pad_token_id, self.max_prompt, self.cfg.max_length, share)

    @staticmethod
    def seq_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs and completion token counts per sequence."""
        logps, mask = batch_token_logps(model, batch)
        return logps.sum(-1), mask.sum(-1)

    def reference_logps(self, batch, cached_key: str) -> torch.Tensor:
        """Cached reference sums when the batch carries them, else computed by the resident reference."""
        if cached_key in batch:
            return batch[cached_key]
        if self.ref_model is None:
            raise RuntimeError(f"objective {self.name} needs reference log-probs: no '{cached_key}' and no reference model")
        with torch.no_grad():
            return self.seq_logps(self.ref_model, batch)[0]

    def add_cached(self, out: dict, rows: list[dict], mapping: dict[str, str]) -> dict:
        """Copy cached reference columns into the batch when every row has them."""
        for key, col in mapping.items():
            if all(r.get(col) is not None for r in rows):
                out[key] = column(rows, col, torch.float32)
        return out


class SFT(Objective):
    """Supervised fine-tuning: completion-only NLL, prompt tokens masked, averaged per example."""

    name = "sft"

    def collate(self, rows, tokenizer):
        out = self.seqs(tokenizer, rows, ["generation1"])
        out["weights"] = column(rows, "generation1_weight", default=1.0)
        return out

    def token_logps(self, model, batch):
        return completion_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])

    def per_example_loss(self, model, batch):
        logps, mask = self.token_logps(model, batch)
        return L.sft_nll(logps, mask), {"tokens": mask.sum(-1)}


class RewardBT(Objective):
    """Bradley-Terry reward model: -log sigmoid(s_chosen - s_rejected - margin) (Ouyang et al., 2022).

    Chosen and rejected texts go through the scalar-head classifier in one forward pass.
    """

    name = "reward"
    model_kind = "sequence_classifier"
    needs = ("generation1", "generation2")

    def collate(self, rows, tokenizer):
        # Prompt + text as one input; a too-long one loses the prompt's start, never the text judged.
        ids = for_classifier(tokenizer, [(r["prompt"], r[col]) for col in ("generation1", "generation2") for r in rows],
                             self.cfg.max_length)
        # A pair's weight is the product of its two samples' weights.
        weights = column(rows, "generation1_weight", default=1.0) * column(rows, "generation2_weight", default=1.0)
        return {"input_ids": pad(ids, tokenizer.pad_token_id), "attention_mask": pad([[1] * len(x) for x in ids], 0),
                "weights": weights}

    def scores(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().squeeze(-1)
        return out.chunk(2)

    def per_example_loss(self, model, batch):
        s_c, s_r = self.scores(model, batch)
        return L.bradley_terry(s_c, s_r, self.opt.margin), {
            "accuracy": (s_c > s_r).float(), "margin": (s_c - s_r).detach(),
            "tokens": batch["attention_mask"].sum(-1).view(2, -1).sum(0).float()}


class DPO(Objective):
    """DPO (Rafailov et al., 2023) and its family: sigmoid (+ label smoothing = conservative DPO),
    IPO, hinge, reference-free. Widening the policy's log-ratio margin over the reference's between
    chosen and rejected raises the chosen's likelihood without a reward model or sampling."""

    name = "dpo"
    needs = ("prompt", "generation1", "generation2")
    reference_columns = ("reference_logp1", "reference_logp2")

    def uses_reference(self):
        return not self.opt.reference_free

    def collate(self, rows, tokenizer):
        out = self.seqs(tokenizer, rows, ["generation1", "generation2"], share_prompt=True)
        out["weights"] = column(rows, "generation1_weight", default=1.0) * column(rows, "generation2_weight", default=1.0)
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


class KTO(Objective):
    """KTO (Ethayarajh et al., 2024): pointwise desirable / undesirable labels, no pairs needed.
    A prospect-theory value of the log-ratio against a reference point z0 (a batch-free estimate of
    the policy's KL to the reference, from mismatched prompt/completion pairs).

    Each record carries its own mismatched completion (`kl_generation`, another record's
    generation1, assigned by build_pool), so z0 needs no second example in the batch: batch size 1
    works, and the mismatch pairing is fixed, which lets the reference stage cache its log-probs.
    """

    name = "kto"
    needs = ("prompt", "generation1", "desirable", "kl_generation")
    reference_columns = ("reference_logp1", "reference_kl_logp")

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
                                         self.opt.desirable_weight, self.opt.undesirable_weight)
        d = batch["desirable"].float()
        return losses, {"rewards": rewards, "kl_z0": z0.expand_as(rewards), "desirable_fraction": d,
                        "tokens": n.chunk(2)[0]}


class ConditionedNLL(Objective):
    """Quark (Lu et al., 2022) and NLF: NLL of the generation given a conditioned prompt, plus
    kl_coef * per-token KL to the reference (which sees the unconditioned prompt), minus
    entropy_coef * entropy. Conditioning on a reward token or on feedback teaches the model what
    each level of quality looks like; at sampling time one conditions on the best."""

    needs = ("prompt", "generation1")
    reference_columns = ("reference_token_logps1",)

    def prefix(self, row, tokenizer) -> tuple[int, ...]:
        """The conditioning token ids put before the row's prompt (they count toward max_prompt_length)."""
        raise NotImplementedError

    def uses_reference(self):
        return self.opt.kl_coef > 0

    def collate(self, rows, tokenizer):
        out = self.seqs(tokenizer, rows, ["generation1"], [self.prefix(r, tokenizer) for r in rows])
        # The reference sees the unconditioned prompt; the completion tokens are the same.
        out.update({f"ref_{k}": v for k, v in self.seqs(tokenizer, rows, ["generation1"]).items()})
        out["weights"] = column(rows, "generation1_weight", default=1.0)
        if self.opt.kl == "cached" and all(r.get("reference_token_logps1") is not None for r in rows):
            width = out["completion_mask"].shape[1] - 1
            grid = torch.zeros(len(rows), width)
            cm = out["completion_mask"][:, 1:].bool()
            for i, r in enumerate(rows):
                vals = torch.tensor(r["reference_token_logps1"], dtype=torch.float32)
                grid[i][cm[i]] = vals[: int(cm[i].sum())]
            out["ref_token_logps"] = grid
        return out

    def per_example_loss(self, model, batch):
        ref_batch = {k[4:]: v for k, v in batch.items() if k.startswith("ref_") and k != "ref_token_logps"}
        exact = self.opt.kl == "exact" and self.opt.kl_coef > 0
        logp, kl, ent, mask = completion_token_stats(model, batch, self.ref_model if exact else None, ref_batch,
                                                     self.opt.kl_direction)
        if self.opt.kl == "cached" and self.opt.kl_coef > 0:
            if "ref_token_logps" not in batch:
                raise RuntimeError(f"{self.name}: kl 'cached' needs the reference stage's per-token log-probs")
            kl = L.sampled_kl(logp, batch["ref_token_logps"], self.opt.kl_direction) * mask
        loss = L.conditioned_nll(logp, kl, ent, mask, self.opt.kl_coef, self.opt.entropy_coef)
        n = mask.sum(-1).clamp(min=1)
        return loss, {"kl": (kl * mask).sum(-1) / n, "entropy": (ent * mask).sum(-1) / n, "tokens": mask.sum(-1)}


class Quark(ConditionedNLL):
    name = "quark"
    needs = ("prompt", "generation1", "control")

    def prefix(self, row, tokenizer):
        return (tokenizer.convert_tokens_to_ids(row["control"]),)


class NLF(ConditionedNLL):
    name = "nlf"
    needs = ("prompt", "generation1", "feedback")

    def prefix(self, row, tokenizer):
        return tuple(text_ids(tokenizer, feedback_prefix(self.opt.feedback_template, row["feedback"])))


class RLOO(Objective):
    """Online RL: REINFORCE with a leave-one-out baseline over each prompt's n samples (RLOO,
    Ahmadian et al., 2024) on rewards from the annotate stage, with a KL penalty to the reference
    folded into the reward. Batches hold whole prompt groups."""

    name = "rl"
    needs = ("prompt", "generation1", "generation1_reward")
    reference_columns = ("reference_logp1",)
    group_by = "prompt_id"

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


OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (SFT, RewardBT, DPO, KTO, Quark, NLF, RLOO)}


def make_objective(cfg) -> Objective:
    return OBJECTIVES[cfg.objective](cfg)


class AdapterOff:
    """The LoRA policy with its adapters switched off: the reference model without a second copy."""

    def __init__(self, peft_model):
        self.model = peft_model

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_decoder(self):
        decoder = self.model.get_decoder()
        model = self.model

        def run(**kw):
            with model.disable_adapter():
                return decoder(**kw)
        return run

