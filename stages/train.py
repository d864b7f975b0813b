"""train: fit the configured objective on the pool's training records.

Writes `model/` (safetensors weights + tokenizer, loadable with `from_pretrained`) and
`metrics.jsonl`; its table is the per-step metrics. Checkpoints for resuming live in the runner's
resume folder, outside the artifact, and go away once the artifact is complete.
"""

from __future__ import annotations

import json

import pyarrow as pa

from stages.config import TrainConfig
from stages.errors import BadInput
from stages.models import load_model_for, load_tokenizer, model_identity, resolve_model
from stages.objectives import make_objective
from stages.schemas import check_columns
from stages.trainer import fit

NAME = "train"
VERSION = "1"
INPUTS = ("build_pool",)

NEEDS = {
    "sft": {"prompt": pa.string(), "generation1": pa.string(), "generation1_weight": pa.float64()},
    "reward": {"prompt": pa.string(), "generation1": pa.string(), "generation2": pa.string(),
               "generation1_weight": pa.float64(), "generation2_weight": pa.float64()},
}


def identity(cfg: TrainConfig) -> dict:
    return {"model": model_identity(cfg.model, "train.model")}


def run(ctx, cfg: TrainConfig):
    from stages.runner import StageOutput

    records = ctx.inputs["build_pool"].table()
    check_columns(records, {**NEEDS[cfg.objective], "split": pa.string()}, "train input (build_pool)")
    rows = [r for r in records.to_pylist() if r["split"] == "train"]
    needed = [c for c in NEEDS[cfg.objective] if not c.endswith("_weight")]
    for i, r in enumerate(rows):
        missing = [c for c in needed if r[c] is None and c != "prompt"]
        if missing:
            raise BadInput(f"train: record {i} ({r.get('prompt_id')}) has no '{missing[0]}' for objective '{cfg.objective}'")
    if not rows:
        raise BadInput("train: the pool has no training records (split 'train')")

    objective = make_objective(cfg)
    path = resolve_model(cfg.model, "train.model")
    ctx.log.info("train: %s on %d records, model %s", cfg.objective, len(rows), path)
    tokenizer = load_tokenizer(path)
    model = load_model_for(objective.model_kind, path, tokenizer)
    history = fit(model, tokenizer, objective, rows, cfg, ctx.seed, ctx.resume_dir)

    out = ctx.workdir / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (ctx.workdir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    last = history[-1]
    speeds = sorted(h["tokens_per_s"] for h in history if h["tokens_per_s"])
    metrics = {"steps": len(history), "final_loss": last["loss"], "records": len(rows),
               "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
               **{k: v for k, v in last.items() if k in ("accuracy", "margin")}}
    return StageOutput(pa.Table.from_pylist(history), metrics)
