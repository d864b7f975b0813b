"""Bradley-Terry reward model: -log sigmoid(s_chosen - s_rejected - margin) (Ouyang et al., 2022)."""

from __future__ import annotations

import torch

from stages.training import losses as L
from stages.training.objectives.base import Objective, pair_weights
from stages.pipeline.sections import Section
from stages.data.tokens import for_classifier, pad


class RewardBT(Objective):
    """A scalar head learns to rank the preferred text above the other; its sigmoid is then
    P(preferred), the reward the online flows score with. Chosen and rejected go through the
    classifier in one forward pass."""

    name = "reward"
    model_kind = "sequence_classifier"
    needs = ("generation1", "generation2")

    class Options(Section):
        margin: float = 0.0  # -log sigmoid(s_c - s_r - margin)

    def collate(self, rows, tokenizer):
        # Prompt + text as one input; a too-long one loses the prompt's start, never the text judged.
        ids = for_classifier(tokenizer, [(r["prompt"], r[col]) for col in ("generation1", "generation2") for r in rows],
                             self.cfg.max_length)
        return {"input_ids": pad(ids, tokenizer.pad_token_id), "attention_mask": pad([[1] * len(x) for x in ids], 0),
                "weights": pair_weights(rows)}

    def scores(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().squeeze(-1)
        return out.chunk(2)

    def per_example_loss(self, model, batch):
        s_c, s_r = self.scores(model, batch)
        return L.bradley_terry(s_c, s_r, self.opt.margin), {
            "accuracy": (s_c > s_r).float(), "margin": (s_c - s_r).detach(),
            "tokens": batch["attention_mask"].sum(-1).view(2, -1).sum(0).float()}

    def heldout(self, model, tokenizer, rows, batch_size):
        """Pairwise accuracy: does the preferred text score higher?"""
        out = []
        with torch.no_grad():
            for k in range(0, len(rows), batch_size):
                chunk = rows[k:k + batch_size]
                s_c, s_r = self.scores(model, self.collate(chunk, tokenizer))
                out.extend({"prompt_id": r["prompt_id"], "score_chosen": a, "score_rejected": b, "correct": a > b}
                           for r, a, b in zip(chunk, s_c.tolist(), s_r.tolist()))
        return out, {"pairwise_accuracy": sum(r["correct"] for r in out) / len(out), "pairs": len(out)}

    def summary(self, metrics):
        return f"held-out pairwise accuracy {metrics['pairwise_accuracy']:.3f}"
