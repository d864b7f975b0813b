"""Training objectives. Adding one is a subclass with `collate` and `per_example_loss`.

An objective turns records (rows of stages/schemas.RECORDS) into tensors and a batch into
per-example losses plus metrics; the trainer owns weights, reduction, optimisation and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.losses import bradley_terry, sft_nll, token_logprobs


def encode_completion(tokenizer, prompt: str, completion: str, max_prompt: int, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + EOS, and a mask that is 1 on completion tokens only.

    The prompt keeps its last `max_prompt` tokens; the whole keeps its first `max_length`.
    """
    p = tokenizer(prompt, add_special_tokens=False).input_ids[-max_prompt:] if prompt else []
    sep = " " if prompt and completion and not completion[0].isspace() and not prompt[-1].isspace() else ""
    c = tokenizer(sep + completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = (p + c)[:max_length]
    return ids, ([0] * len(p) + [1] * len(c))[:max_length]


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


@dataclass
class Objective:
    max_length: int = 128
    max_prompt_length: int = 64
    margin: float = 0.0

    name = "base"
    model_kind = "causal_lm"  # or "sequence_classifier"

    def collate(self, rows: list[dict], tokenizer) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def per_example_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class SFT(Objective):
    """Supervised fine-tuning: completion-only NLL, prompt tokens masked, averaged per example."""

    name = "sft"

    def collate(self, rows, tokenizer):
        enc = [encode_completion(tokenizer, r["prompt"], r["generation1"], self.max_prompt_length, self.max_length) for r in rows]
        ids = pad([e[0] for e in enc], tokenizer.pad_token_id)
        return {
            "input_ids": ids,
            "attention_mask": pad([[1] * len(e[0]) for e in enc], 0),
            "completion_mask": pad([e[1] for e in enc], 0),
            "weights": torch.tensor([r.get("generation1_weight", 1.0) for r in rows], dtype=torch.float32),
        }

    def token_logps(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = batch["completion_mask"][:, 1:].to(torch.float32)
        return token_logprobs(logits, batch["input_ids"][:, 1:], mask), mask

    def per_example_loss(self, model, batch):
        logps, mask = self.token_logps(model, batch)
        loss = sft_nll(logps, mask)
        return loss, {"tokens": mask.sum(-1)}


class RewardBT(Objective):
    """Bradley-Terry reward model: -log sigmoid(s_chosen - s_rejected - margin) (Ouyang et al., 2022).

    Chosen and rejected texts go through the scalar-head classifier in one forward pass.
    """

    name = "reward"
    model_kind = "sequence_classifier"

    def texts(self, rows, column):
        return [" ".join(filter(None, [r["prompt"], r[column]])) for r in rows]

    def collate(self, rows, tokenizer):
        enc = tokenizer(self.texts(rows, "generation1") + self.texts(rows, "generation2"), truncation=True,
                        max_length=self.max_length, padding=True, return_tensors="pt")
        w1 = torch.tensor([r.get("generation1_weight", 1.0) for r in rows], dtype=torch.float32)
        w2 = torch.tensor([r.get("generation2_weight", 1.0) for r in rows], dtype=torch.float32)
        # A pair's weight is the product of its two samples' weights.
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "weights": w1 * w2}

    def scores(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().squeeze(-1)
        return out.chunk(2)

    def per_example_loss(self, model, batch):
        s_c, s_r = self.scores(model, batch)
        loss = bradley_terry(s_c, s_r, self.margin)
        return loss, {"accuracy": (s_c > s_r).float(), "margin": (s_c - s_r).detach(),
                      "tokens": batch["attention_mask"].sum(-1).view(2, -1).sum(0).float()}


OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (SFT, RewardBT)}


def make_objective(cfg) -> Objective:
    return OBJECTIVES[cfg.objective](max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, margin=cfg.margin)
