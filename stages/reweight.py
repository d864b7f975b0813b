"""reweight: the SampleReweighter. Sets a weight per sample; build_pool carries it into the
records' generation weights and every loss multiplies by it.

Strategies compose (their weights multiply), and the result is normalised to mean 1:
- uniform: 1 for all.
- reward_softmax: softmax(score / temperature) within each prompt's samples (times their count).
- balance: equal total weight per class (score above / at-or-below the median) or per quantile.
- importance: pi_train(y) / pi_sample(y), the shift between the policy that produced a sample
  (its recorded log-prob) and the policy being trained (computed here); self-normalised, clipped.
- callable: a dotted path f(rows) -> weights.
The manifest reports the effective sample size (sum w)^2 / sum w^2.
"""

from __future__ import annotations

import math
import statistics

import pyarrow as pa

from stages.annotators import load_callable
from stages.config import ReweightConfig, ReweightStrategy
from stages.pipeline.context import StageOutput, stage
from stages.data.schemas import by_prompt
from stages.pipeline.errors import BadInput
from stages.services.models import resolve_model
from stages.services.scoring import sequence_logps

def normalise(w: list[float]) -> list[float]:
    mean = sum(w) / len(w)
    if not mean > 0:
        raise BadInput("reweight: all weights are zero")
    return [x / mean for x in w]


def effective_sample_size(w: list[float]) -> float:
    return sum(w) ** 2 / sum(x * x for x in w)


def reward_softmax(rows: list[dict], temperature: float) -> list[float]:
    w = [0.0] * len(rows)
    for idx in by_prompt(rows).values():
        top = max(rows[i]["score"] for i in idx)
        exps = [math.exp((rows[i]["score"] - top) / temperature) for i in idx]
        z = sum(exps)
        for i, e in zip(idx, exps):
            w[i] = len(idx) * e / z
    return w


def balance(rows: list[dict], by: str, quantiles: int) -> list[float]:
    scores = [r["score"] for r in rows]
    if by == "median":
        cut = statistics.median(scores)
        cls = [int(s > cut) for s in scores]
    else:
        ranked = sorted(range(len(rows)), key=lambda i: scores[i])
        cls = [0] * len(rows)
        for rank, i in enumerate(ranked):
            cls[i] = rank * quantiles // len(rows)
    counts = {c: cls.count(c) for c in set(cls)}
    return [len(rows) / (len(counts) * counts[c]) for c in cls]  # each class totals n / classes


def importance(rows: list[dict], train_logps: list[float], clip: float) -> list[float]:
    log_ratio = [t - r["policy_logprob"] for t, r in zip(train_logps, rows)]
    top = max(log_ratio)
    w = normalise([math.exp(x - top) for x in log_ratio])  # self-normalised (stable in log space)
    return [min(x, clip) for x in w]


def strategy_weights(s: ReweightStrategy, rows: list[dict], ctx) -> list[float]:
    if s.kind == "uniform":
        return [1.0] * len(rows)
    if s.kind == "reward_softmax":
        return reward_softmax(rows, s.temperature)
    if s.kind == "balance":
        return balance(rows, s.balance_by, s.quantiles)
    if s.kind == "importance":
        if s.policy:
            path = resolve_model(s.policy, "reweight.policy")
        elif "train" in ctx.inputs:
            path = ctx.inputs["train"].model_dir()
        else:
            path = resolve_model(rows[0]["checkpoint"], "reweight.policy")
        # the same tokens, in the same (conditioned) context, that the sampling policy scored
        return importance(rows, sequence_logps(path, [(r["conditioning_ids"] or []) + r["prompt_ids"] for r in rows],
                                               [r["completion_ids"] for r in rows]), s.clip)
    fn = load_callable(s.callable or "", "reweight.callable")
    w = fn(rows)
    if len(w) != len(rows) or any(not isinstance(x, (int, float)) or x < 0 or math.isnan(x) for x in w):
        raise BadInput(f"reweight.callable {s.callable} must return {len(rows)} non-negative numbers")
    return [float(x) for x in w]


@stage("reweight", version="2", inputs=("annotate", "train@prev"))
def run(ctx, cfg: ReweightConfig) -> StageOutput:
    table = ctx.inputs["annotate"].table()
    rows = table.to_pylist()
    scored = [r for r in rows if r["score"] is not None]
    if not scored:
        raise BadInput("reweight: no sample has a score")
    weights = [1.0] * len(scored)
    for s in cfg.strategies:
        weights = [a * b for a, b in zip(weights, strategy_weights(s, scored, ctx))]
    weights = normalise(weights)
    out = pa.Table.from_pylist(scored, schema=table.schema).append_column("weight", pa.array(weights, pa.float64()))
    ess = effective_sample_size(weights)
    ctx.log.info("reweight: %s, effective sample size %.1f of %d", "+".join(s.kind for s in cfg.strategies), ess, len(weights))
    return StageOutput(out, {"effective_sample_size": ess, "samples": len(weights), "dropped_unscored": len(rows) - len(scored),
                             "max_weight": max(weights), "min_weight": min(weights)})
