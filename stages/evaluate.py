"""evaluate: score the trained model on the held-out records.

- sft: held-out completion NLL per token and perplexity, for the trained and the base model.
- reward: pairwise accuracy on held-out pairs (does the preferred text score higher?).
- the other objectives: their own loss and metrics on held-out records (for DPO, the implicit
  reward accuracy and margin; for KTO, the rewards and z0). Reward-model scores of fresh samples
  come with the online stages.
The table holds one row per held-out record; the metrics go to the manifest and the report.
"""

from __future__ import annotations

import math

import pyarrow as pa
import torch

from stages.config import EvaluateConfig, TrainConfig
from stages.errors import BadInput
from stages.models import load_model_for, load_tokenizer, resolve_model
from stages.objectives import RewardBT
from stages.train import attach_reference, pool_rows, prepare

NAME = "evaluate"
VERSION = "3"
INPUTS = ("build_pool", "reference", "train", "load_prompts@0")


def batches(rows: list[dict], size: int):
    for k in range(0, len(rows), size):
        yield rows[k:k + size]


@torch.no_grad()
def sft_heldout(model, tokenizer, objective, rows, batch_size) -> list[dict]:
    model.eval()
    out = []
    for chunk in batches(rows, batch_size):
        logps, mask = objective.token_logps(model, objective.collate(chunk, tokenizer))
        out.extend({"prompt_id": r["prompt_id"], "logprob": lp, "tokens": int(m)}
                   for r, lp, m in zip(chunk, logps.sum(-1).tolist(), mask.sum(-1).tolist()))
    return out


@torch.no_grad()
def reward_heldout(model, tokenizer, objective: RewardBT, rows, batch_size) -> list[dict]:
    model.eval()
    out = []
    for chunk in batches(rows, batch_size):
        s_c, s_r = objective.scores(model, objective.collate(chunk, tokenizer))
        out.extend({"prompt_id": r["prompt_id"], "score_chosen": a, "score_rejected": b, "correct": a > b}
                   for r, a, b in zip(chunk, s_c.tolist(), s_r.tolist()))
    return out


@torch.no_grad()
def objective_heldout(model, tokenizer, objective, rows, batch_size) -> list[dict]:
    """Any objective's own per-example loss and metrics on held-out records."""
    model.eval()
    out = []
    for chunk in batches(rows, batch_size):
        loss, metrics = objective.per_example_loss(model, objective.collate(chunk, tokenizer))
        out.extend({"prompt_id": r["prompt_id"], "loss": float(loss[i]),
                    **{m: float(v[i]) for m, v in metrics.items() if v.dim() == 1 and len(v) == len(chunk)}}
                   for i, r in enumerate(chunk))
    return out


def generate_and_score(ctx, cfg: EvaluateConfig, model_path, train_cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Online flows: sample held-out prompts from the trained policy, score them like the round
    did, and measure the KL to the reference on those samples (log pi(y) - log ref(y))."""
    from stages.annotate import checked_scores
    from stages.annotators import ANNOTATORS, TemplateFeedback
    from stages.reweight import sequence_logps
    from stages.sample import generate_hf

    prompts = [r for r in ctx.inputs["load_prompts"].table().to_pylist() if r["split"] == "heldout"]
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
    if not prompts:
        raise BadInput("evaluate: no held-out prompts (raise load_prompts.heldout_fraction)")
    gen_cfg = cfg.generation.model_copy(update={"n": 1})
    texts = [r["prompt"] for r in prompts]
    samples = [g[0] for g in generate_hf(model_path, texts, gen_cfg, ctx.seed + 7, ctx.log)]
    rows = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], **g} for r, g in zip(prompts, samples)]
    scores: list = [None] * len(rows)
    for step in (cfg.annotate.steps if cfg.annotate else []):
        if step.kind == "template_feedback":
            continue
        out = ANNOTATORS[step.kind](step)([r["prompt"] for r in rows], [r["completion"] for r in rows])
        scores = checked_scores(out.get("score"), len(rows), f"evaluate ({step.kind})", allow_missing=True)
    ref_path = resolve_model(train_cfg.reference_model or train_cfg.model, "train.reference_model")
    # The reference sees the unconditioned prompt (the KL convention of Quark / NLF) and the sampled tokens.
    ref = sequence_logps(ref_path, [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
    for r, sc, lr in zip(rows, scores, ref):
        r.update({"score": sc, "reference_logprob": lr, "kl": r["policy_logprob"] - lr})
    known = [x for x in scores if x is not None]
    metrics = {}
    if cfg.compare_base and ctx.round == 0 and cfg.annotate:
        base_path = resolve_model(train_cfg.model, "train.model")
        base = [g[0] for g in generate_hf(base_path, texts, gen_cfg, ctx.seed + 7, ctx.log)]
        step = next((s for s in cfg.annotate.steps if s.kind != "template_feedback"), None)
        if step is not None:
            out = ANNOTATORS[step.kind](step)([r["prompt"] for r in prompts], [g["completion"] for g in base])
            got = [x for x in checked_scores(out.get("score"), len(base), "evaluate (base)", True) if x is not None]
            metrics["base_mean_reward"] = sum(got) / len(got) if got else None
    metrics |= {"mean_reward": sum(known) / len(known) if known else None,
               "kl_to_reference": sum(r["kl"] for r in rows) / len(rows),
               "mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / len(rows),
               "truncated_fraction": sum(r["truncated"] for r in rows) / len(rows), "prompts": len(rows),
               "examples": [{"prompt": r["prompt"], "completion": r["completion"], "score": r["score"]}
                            for r in rows[: cfg.samples_to_show]]}
    return rows, metrics


def _nll(rows: list[dict]) -> float:
    return -sum(r["logprob"] for r in rows) / max(1, sum(r["tokens"] for r in rows))


def run(ctx, cfg: EvaluateConfig):
    """Held-out metrics of the objective on the pool's held-out records, and, with `generation`
    set (online flows fill it in; offline flows may set it), the trained policy's samples on the
    held-out prompts, scored. The table holds the samples when there are any, else the records."""
    from stages.runner import StageOutput

    train_cfg = TrainConfig.model_validate(ctx.inputs["train"].manifest["config"])
    rows = pool_rows(ctx, "heldout")
    rows = rows[: cfg.max_records] if cfg.max_records else rows
    if cfg.generation is None and not rows:
        raise BadInput("evaluate: the pool has no held-out records (raise load_prompts.heldout_fraction)")
    table, metrics = None, {}
    if rows:
        table, metrics = objective_metrics(ctx, cfg, train_cfg, rows)
    if cfg.generation is not None:
        scored, generated = generate_and_score(ctx, cfg, ctx.inputs["train"].local_dir() / "model", train_cfg)
        ctx.log.info("evaluate: held-out mean reward %s, KL to reference %.3f nats",
                     f"{generated['mean_reward']:.4f}" if generated["mean_reward"] is not None else "-",
                     generated["kl_to_reference"])
        table, metrics = pa.Table.from_pylist(scored), {**metrics, **generated}
    return StageOutput(table, metrics)


def objective_metrics(ctx, cfg: EvaluateConfig, train_cfg: TrainConfig, rows: list[dict]) -> tuple[pa.Table, dict]:
    """The trained model on held-out pool records, by its objective: pairwise accuracy (reward),
    NLL against the base model's (sft), or the objective's own loss and metrics."""
    trained = ctx.inputs["train"].local_dir() / "model"
    objective, model, tokenizer = prepare(train_cfg, rows, ctx.seed, model_path=trained, training=False)
    ctx.log.info("evaluate: %s on %d held-out records", train_cfg.objective, len(rows))

    if objective.name == "reward":
        scored = reward_heldout(model, tokenizer, objective, rows, cfg.batch_size)
        accuracy = sum(r["correct"] for r in scored) / len(scored)
        ctx.log.info("evaluate: held-out pairwise accuracy %.3f", accuracy)
        return pa.Table.from_pylist(scored), {"pairwise_accuracy": accuracy, "pairs": len(scored)}

    if objective.name == "sft":
        scored = sft_heldout(model, tokenizer, objective, rows, cfg.batch_size)
        base_path = resolve_model(train_cfg.model, "train.model")
        base = load_model_for(objective.model_kind, base_path, load_tokenizer(base_path))
        before = sft_heldout(base, tokenizer, objective, rows, cfg.batch_size)
        for r, b in zip(scored, before):
            r["base_logprob"] = b["logprob"]
        nll, base_nll = _nll(scored), _nll(before)
        ctx.log.info("evaluate: held-out NLL per token %.4f (base model %.4f)", nll, base_nll)
        return pa.Table.from_pylist(scored), {
            "heldout_nll": nll, "heldout_perplexity": math.exp(nll),
            "base_heldout_nll": base_nll, "base_heldout_perplexity": math.exp(base_nll), "records": len(scored)}

    attach_reference(objective, train_cfg.model_copy(update={"lora": None}), rows, model)
    scored = objective_heldout(model, tokenizer, objective, rows, cfg.batch_size)
    keys = [k for k in scored[0] if k != "prompt_id"]
    metrics = {f"heldout_{k}": sum(r[k] for r in scored) / len(scored) for k in keys}
    ctx.log.info("evaluate: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return pa.Table.from_pylist(scored), {**metrics, "records": len(scored)}
