"""train: fit the configured objective on the pool's training records.

Writes `model/` (safetensors weights + tokenizer, loadable with `from_pretrained`; LoRA adapters
are merged in; a model card, README.md) and `metrics.jsonl`; its table is the per-step metrics. Reads the reference stage's
table when the flow has one (the pool plus cached reference log-probs), else the pool itself.
Checkpoints for resuming live in the runner's resume folder, outside the artifact.
"""

from __future__ import annotations

import pyarrow as pa

from stages.config import TrainConfig
from stages.pipeline.context import StageOutput, stage
from stages.pipeline.errors import BadInput
from stages.services.model_card import write_model_card
from stages.services.models import model_identity
from stages.services.training_run import TrainJob, launch, train_and_save
from stages.services.training_setup import pool_rows
from stages.training.precision import resolve


def identity(cfg: TrainConfig) -> dict:
    # auto's choice is this machine's: a float32 artifact is not a bf16 one (a shared S3 root)
    ident = {"model": model_identity(cfg.model, "train.model"), "precision": resolve(cfg.mixed_precision)}
    if cfg.reference_model:
        ident["reference_model"] = model_identity(cfg.reference_model, "train.reference_model")
    return ident


@stage("train", version="5", inputs=("build_pool", "reference", "train@prev"), identity=identity)
def run(ctx, cfg: TrainConfig) -> StageOutput:
    rows = pool_rows(ctx, "train")
    if not rows:
        raise BadInput("train: the pool has no training records (split 'train')")
    start = ctx.inputs["train"].model_dir() if "train" in ctx.inputs else None  # online: last round's policy
    job = TrainJob(config=cfg.model_dump(mode="json"), seed=ctx.seed, init_seed=ctx.round_seed,
                   start=str(start) if start else None, resume_dir=str(ctx.resume_dir), out_dir=str(ctx.workdir),
                   run_name=f"{ctx.experiment}-round-{ctx.round}")
    if cfg.processes > 1 or cfg.accelerate_config:
        history, mode = launch(job, rows, cfg.processes, cfg.accelerate_config)
    else:
        history, mode = train_and_save(job, rows)
    last = history[-1]
    speeds = sorted(h["tokens_per_s"] for h in history if h["tokens_per_s"])
    metrics = {"steps": len(history), "final_loss": last["loss"], "records": len(rows), "reference": mode,
               "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
               **{k: v for k, v in last.items() if k not in ("step", "epoch", "loss", "learning_rate", "grad_norm",
                                                             "tokens", "tokens_per_s")}}
    write_model_card(ctx.workdir / "model", cfg, ctx.experiment, ctx.round, str(start) if start else None, len(rows),
                     metrics)
    return StageOutput(pa.Table.from_pylist(history), metrics)
