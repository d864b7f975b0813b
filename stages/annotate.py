"""annotate: feedback on each sample from one or more annotator steps (stages/services/annotation.py).

Adds `score` (float, null where an LLM's answer held no readable score) and `feedback` (text, or
null). A step that raises, returns the wrong number of values, or returns NaN / non-numbers fails
the stage with a one-line error; earlier stages' artifacts stay as they were, and a re-run after
the fix resumes here.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from stages.services.annotation import mean_known, run_steps
from stages.annotators import ANNOTATORS
from stages.config import AnnotateConfig
from stages.pipeline.context import StageOutput, stage
from stages.services.shards import map_shards


def identity(cfg: AnnotateConfig) -> dict:
    """The models the steps read (their config.json and weights' identity)."""
    idents = {f"step{i}": ANNOTATORS[step.kind].identity(step) for i, step in enumerate(cfg.steps)}
    return {k: v for k, v in idents.items() if v is not None}


@stage("annotate", version="1", inputs=("sample",), identity=identity)
def run(ctx, cfg: AnnotateConfig) -> StageOutput:
    samples = ctx.inputs["sample"].table()
    prompts, completions = samples.column("prompt").to_pylist(), samples.column("completion").to_pylist()
    scored, where = map_shards(annotate_shard, list(zip(prompts, completions)), cfg.shards, cfg, seed=ctx.round_seed)
    score, feedback = [s for s, _ in scored], [f for _, f in scored]
    table = samples.append_column("score", pa.array(score, pa.float64())).append_column("feedback", pa.array(feedback, pa.string()))
    n, mean = len(prompts), mean_known(score)
    unscored = sum(s is None for s in score)
    ctx.log.info("annotate: mean score %s over %d samples (%d unscored)", f"{mean:.4f}" if mean is not None else "-",
                 n, unscored)
    return StageOutput(table, {"samples": n, "unscored": unscored, "mean_score": mean,
                               **({"shards_ran_on": where} if cfg.shards > 1 else {})})


def annotate_shard(pairs: list[tuple[str, str]], shard: int, cfg: AnnotateConfig) -> list[tuple]:
    """One shard's (score, feedback) per sample (a Ray task when annotate.shards > 1)."""
    score, feedback = run_steps(cfg.steps, [p for p, _ in pairs], [c for _, c in pairs], "annotate", logging.getLogger("align"))
    return list(zip(score, feedback))
