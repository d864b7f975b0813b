"""The Objective base class, its registry, and the batching every objective shares.

An objective turns records (rows of stages/schemas.RECORDS) into tensors, and a batch into
per-example losses plus per-example metrics. The trainer owns weights, reduction, optimisation and
checkpoints. Objectives that compare with a reference read its log-probs from the pool's cached
`reference_*` columns (the reference stage) or, when those are absent, from `self.ref_model`
(the reference model resident, or the LoRA policy with its adapters switched off).

A subclass that sets `name` registers itself: `train.objective: <name>` picks it and its `Options`
model becomes the config section `train.<name>`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from stages.training.logprobs import completion_token_logps, shared_prompt_token_logps
from stages.pipeline.errors import BadInput
from stages.pipeline.sections import Section
from stages.data.tokens import Sequence, join, of_record, pad

OBJECTIVES: dict[str, type["Objective"]] = {}


def sequences(seqs: list[Sequence], pad_id: int, max_prompt: int, max_length: int, share_prompt: bool = False) -> dict:
    """A right-padded batch of sequences under the token rules (stages/data/tokens.py).

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
    """`join` outputs as unique prompts, the prompt of each row, and the rows' completions;
    {} when no prompt repeats, or a prompt or completion is empty."""
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


def batch_token_logps(model, batch: dict, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token completion log-probs of a `sequences` batch and their mask, one row per sequence
    (through the shared prompts when the batch has them); `vocab` as logprobs.token_logps."""
    if "shared_prompt_ids" in batch:
        return shared_prompt_token_logps(model, batch["shared_prompt_ids"], batch["shared_prompt_mask"],
                                         batch["shared_prompt_index"], batch["shared_completion_ids"],
                                         batch["shared_completion_mask"], vocab)
    return completion_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], vocab)


def completion_positions(batch: dict) -> torch.Tensor:
    """The bool grid batch_token_logps lays a batch's completion tokens out on, one row per sequence."""
    if "shared_completion_mask" in batch:
        return batch["shared_completion_mask"].bool()
    return batch["completion_mask"][:, 1:].bool()


def token_grid(batch: dict, rows: list[dict], name: str) -> torch.Tensor | None:
    """Per-token values of the rows' column `name` (one per completion token, as the sample or
    reference stage recorded them) on the grid of completion_positions; None unless every row has
    them. Values past a cut completion's kept tokens are dropped."""
    if not rows or any(r.get(name) is None for r in rows):
        return None
    positions = completion_positions(batch)[: len(rows)]
    grid = torch.zeros(positions.shape, dtype=torch.float32)
    for i, r in enumerate(rows):
        kept = int(positions[i].sum())
        if len(r[name]) < kept:
            raise BadInput(f"records column '{name}': record {r.get('prompt_id')!r} has {len(r[name])} values for "
                           f"{kept} completion tokens")
        grid[i][positions[i]] = torch.tensor(r[name][:kept], dtype=torch.float32)
    return grid


def column(rows, name, dtype=torch.float32, default=None):
    return torch.tensor([r.get(name, default) if r.get(name) is not None else default for r in rows], dtype=dtype)


def pair_weights(rows) -> torch.Tensor:
    """A pair's weight: the product of its two samples' weights."""
    return column(rows, "generation1_weight", default=1.0) * column(rows, "generation2_weight", default=1.0)


class Objective:
    """Subclasses set `name` (which registers them), `Options`, the record columns they need, and
    implement `collate` and `per_example_loss`; the hooks below have defaults that fit most."""

    name: ClassVar[str | None] = None
    model_kind: ClassVar[str] = "causal_lm"  # or "sequence_classifier"
    needs: ClassVar[tuple[str, ...]] = ("prompt", "generation1")
    reference_columns: ClassVar[tuple[str, ...]] = ()  # cached reference columns it can use instead of ref_model
    group_by: ClassVar[str | None] = None  # rows sharing this key stay in one batch (a prompt's samples)

    class Options(Section):
        pass

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("name"):
            if cls.name in OBJECTIVES:
                raise TypeError(f"objective '{cls.name}' is registered twice ({OBJECTIVES[cls.name].__module__}, "
                                f"{cls.__module__})")
            OBJECTIVES[cls.name] = cls

    def __init__(self, cfg):
        self.cfg = cfg  # the train section
        self.opt = getattr(cfg, self.name, None)  # the objective's own sub-section (train.dpo, train.kto, ...)
        self.ref_model = None  # set by the trainer when the pool has no cached reference columns

    @property
    def max_prompt(self):
        return self.cfg.max_prompt_length

    # -- hooks ------------------------------------------------------------------------------------
    def uses_reference(self) -> bool:
        return bool(self.reference_columns)

    def needs_reference_logits(self) -> bool:
        """True when cached per-sequence log-probs cannot stand in for a resident reference model."""
        return False

    def updates_per_batch(self) -> int:
        """Optimizer steps taken on each batch of records before the next (GRPO's num_iterations)."""
        return 1

    def prepare_model(self, model, tokenizer, rows: list[dict], seed: int) -> None:
        """Adjust model and tokenizer to the records before training (Quark adds its tokens)."""

    def prepare_training(self, model) -> None:
        """Last changes to the model (after LoRA) before the trainer builds its optimizer (Quark
        gives its control tokens' embeddings a parameter of their own); finish_training undoes them."""

    def finish_training(self, model) -> None:
        """Undo prepare_training on the trained model (LoRA merged) before it is saved."""

    def learning_rate_of(self, name: str, param) -> float | None:
        """A trainable parameter's own learning rate (None: train.learning_rate)."""
        return None

    def heldout(self, model, tokenizer, rows: list[dict], batch_size: int) -> tuple[list[dict], dict]:
        """Per-record rows and metrics on held-out records: by default the objective's own loss and
        per-example metrics, averaged as heldout_<name>."""
        out = []
        with torch.no_grad():
            for k in range(0, len(rows), batch_size):
                chunk = rows[k:k + batch_size]
                loss, metrics = self.per_example_loss(model, self.collate(chunk, tokenizer))
                out.extend({"prompt_id": r["prompt_id"], "loss": float(loss[i]),
                            **{m: float(v[i]) for m, v in metrics.items() if v.dim() == 1 and len(v) == len(chunk)}}
                           for i, r in enumerate(chunk))
        keys = [k for k in out[0] if k != "prompt_id"]
        return out, {f"heldout_{k}": sum(r[k] for r in out) / len(out) for k in keys}

    compare_base_heldout: ClassVar[bool] = False  # evaluate also reports `heldout` of the base model

    def summary(self, metrics: dict) -> str:
        """The held-out metrics as evaluate's log line says them."""
        return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))

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

    def pair_batch(self, rows, tokenizer) -> dict:
        """Pairwise records: every chosen (generation1) then every rejected (generation2) sequence,
        prompts shared, with the pairs' weights."""
        out = self.seqs(tokenizer, rows, ["generation1", "generation2"], share_prompt=True)
        out["weights"] = pair_weights(rows)
        return out

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


def make_objective(cfg) -> Objective:
    return OBJECTIVES[cfg.objective](cfg)
