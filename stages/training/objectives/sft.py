"""Supervised fine-tuning: completion-only NLL, prompt tokens masked, averaged per example."""

from __future__ import annotations

import math

from stages.training import losses as L
from stages.training.logprobs import completion_token_logps
from stages.training.objectives.base import Objective, column


class SFT(Objective):
    """Maximum likelihood of the completion given the prompt: the starting point of every recipe."""

    name = "sft"
    compare_base_heldout = True

    def collate(self, rows, tokenizer):
        out = self.seqs(tokenizer, rows, ["generation1"])
        out["weights"] = column(rows, "generation1_weight", default=1.0)
        return out

    def token_logps(self, model, batch):
        return completion_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])

    def per_example_loss(self, model, batch):
        logps, mask = self.token_logps(model, batch)
        return L.sft_nll(logps, mask), {"tokens": mask.sum(-1)}

    def heldout(self, model, tokenizer, rows, batch_size):
        """Held-out NLL per token (all tokens of all records) and its perplexity."""
        import torch

        out = []
        with torch.no_grad():
            for k in range(0, len(rows), batch_size):
                chunk = rows[k:k + batch_size]
                logps, mask = self.token_logps(model, self.collate(chunk, tokenizer))
                out.extend({"prompt_id": r["prompt_id"], "logprob": lp, "tokens": int(m)}
                           for r, lp, m in zip(chunk, logps.sum(-1).tolist(), mask.sum(-1).tolist()))
        nll = -sum(r["logprob"] for r in out) / max(1, sum(r["tokens"] for r in out))
        return out, {"heldout_nll": nll, "heldout_perplexity": math.exp(nll)}

    def summary(self, metrics):
        base = metrics.get("base_heldout_nll")
        return f"held-out NLL per token {metrics['heldout_nll']:.4f}" + (f" (base model {base:.4f})" if base else "")
