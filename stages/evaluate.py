"""evaluate: score the trained model on the held-out records.

- sft: held-out completion NLL (per token) and perplexity, for the trained and the base model.
- reward: pairwise accuracy on held-out pairs (does the preferred text score higher?).
The table holds one row per held-out record; the metrics go to the manifest and the report.
"""

from __future__ import annotations

import math

import pyarrow as pa
import torch

from stages.config import EvaluateConfig, TrainConfig
from stages.errors import BadInput
from stages.models import load_model_for, load_tokenizer, resolve_model
from stages.objectives import RewardBT, make_objective

NAME = "evaluate"
VERSION = "1"
INPUTS = ("build_pool", "train")


@torch.no_grad()
def sft_heldout(model, tokenizer, objective, rows, batch_size) -> list[dict]:
    model.eval()
    out = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        batch = objective.collate(chunk, tokenizer)
        logps, mask = objective.token_logps(model, batch)
        for r, lp, m in zip(chunk, logps.sum(-1).tolist(), mask.sum(-1).tolist()):
            out.append({"prompt_id": r["prompt_id"], "logprob": lp, "tokens": int(m)})
    return out


@torch.no_grad()
def reward_heldout(model, tokenizer, objective: RewardBT, rows, batch_size) -> list[dict]:
    model.eval()
    out = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        s_c, s_r = objective.scores(model, objective.collate(chunk, tokenizer))
        for r, a, b in zip(chunk, s_c.tolist(), s_r.tolist()):
            out.append({"prompt_id": r["prompt_id"], "score_chosen": a, "score_rejected": b, "correct": a > b})
    return out


def _nll(rows: list[dict]) -> float:
    return -sum(r["logprob"] for r in rows) / max(1, sum(r["tokens"] for r in rows))


def run(ctx, cfg: EvaluateConfig):
    from stages.runner import StageOutput

    train_cfg = TrainConfig.model_validate(ctx.inputs["train"].manifest["config"])
    objective = make_objective(train_cfg)
    rows = [r for r in ctx.inputs["build_pool"].table().to_pylist() if r["split"] == "heldout"]
    if not rows:
        raise BadInput("evaluate: the pool has no held-out records (raise load_prompts.heldout_fraction)")
    rows = rows[: cfg.max_records] if cfg.max_records else rows
    trained = ctx.inputs["train"].local_dir() / "model"
    tokenizer = load_tokenizer(trained)
    model = load_model_for(objective.model_kind, trained, tokenizer)
    ctx.log.info("evaluate: %s on %d held-out records", train_cfg.objective, len(rows))

    if objective.name == "reward":
        scored = reward_heldout(model, tokenizer, objective, rows, cfg.batch_size)
        accuracy = sum(r["correct"] for r in scored) / len(scored)
        ctx.log.info("evaluate: held-out pairwise accuracy %.3f", accuracy)
        return StageOutput(pa.Table.from_pylist(scored), {"pairwise_accuracy": accuracy, "pairs": len(scored)})

    scored = sft_heldout(model, tokenizer, objective, rows, cfg.batch_size)
    base_path = resolve_model(train_cfg.model, "train.model")
    base = load_model_for(objective.model_kind, base_path, load_tokenizer(base_path))
    before = sft_heldout(base, tokenizer, objective, rows, cfg.batch_size)
    for r, b in zip(scored, before):
        r["base_logprob"] = b["logprob"]
    nll, base_nll = _nll(scored), _nll(before)
    ctx.log.info("evaluate: held-out NLL per token %.4f (base model %.4f)", nll, base_nll)
    return StageOutput(pa.Table.from_pylist(scored), {
        "heldout_nll": nll, "heldout_perplexity": math.exp(nll),
        "base_heldout_nll": base_nll, "base_heldout_perplexity": math.exp(base_nll), "records": len(scored)})
