"""annotate: feedback on each sample from one or more annotator steps (stages/annotators.py).

Adds `score` (float, null where an LLM's answer held no readable score) and `feedback` (text, or
null). A step that raises, returns the wrong number of values, or returns NaN / non-numbers fails
the stage with a one-line error; earlier stages' artifacts stay as they were, and a re-run after
the fix resumes here.
"""

from __future__ import annotations

import math

import pyarrow as pa

from stages.annotators import ANNOTATORS, TemplateFeedback, reward_model_path
from stages.config import AnnotateConfig
from stages.errors import BadInput
from stages.models import model_identity

NAME = "annotate"
VERSION = "1"
INPUTS = ("sample",)


def identity(cfg: AnnotateConfig) -> dict:
    ident = {}
    for i, step in enumerate(cfg.steps):
        if step.kind == "reward_model":
            ident[f"step{i}"] = model_identity(reward_model_path(step.model), "annotate.model")
        elif step.kind in ("llm_judge", "llm_feedback"):
            ident[f"step{i}"] = model_identity(step.model or "smollm2", "annotate.model")
    return ident


def checked_scores(values, n: int, where: str, allow_missing: bool) -> list[float | None]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise BadInput(f"{where} returned {got} scores for {n} samples")
    out = []
    for i, v in enumerate(values):
        if v is None and allow_missing:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)) or math.isinf(float(v)):
            raise BadInput(f"{where} returned {v!r} for sample {i}: scores must be finite numbers")
        out.append(float(v))
    return out


def run(ctx, cfg: AnnotateConfig):
    from stages.runner import StageOutput

    samples = ctx.inputs["sample"].table()
    prompts, completions = samples.column("prompt").to_pylist(), samples.column("completion").to_pylist()
    n = len(prompts)
    score: list = [None] * n
    feedback: list = [None] * n
    for i, step in enumerate(cfg.steps):
        where = f"annotate.steps[{i}] ({step.kind}{': ' + step.callable if step.kind == 'rule' else ''})"
        if step.kind == "template_feedback":
            if all(s is None for s in score):
                raise BadInput(f"{where}: needs a scoring step before it")
            feedback = [TemplateFeedback(step).feedback_for(s) for s in score]
            continue
        annotator = ANNOTATORS[step.kind](step)
        ctx.log.info("annotate: %s on %d samples", step.kind, n)
        try:
            out = annotator(prompts, completions)
        except BadInput:
            raise
        except Exception as e:
            raise BadInput(f"{where} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        score = checked_scores(out.get("score"), n, where, allow_missing=step.kind in ("llm_feedback", "llm_judge"))
        if "feedback" in out:
            feedback = list(out["feedback"])
    table = samples.append_column("score", pa.array(score, pa.float64())).append_column("feedback", pa.array(feedback, pa.string()))
    known = [s for s in score if s is not None]
    metrics = {"samples": n, "unscored": n - len(known), "mean_score": sum(known) / len(known) if known else None}
    ctx.log.info("annotate: mean score %s over %d samples (%d unscored)",
                 f"{metrics['mean_score']:.4f}" if known else "-", n, metrics["unscored"])
    return StageOutput(table, metrics)
