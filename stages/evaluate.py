"""evaluate: score the trained model on the held-out records.

- Held-out records, by the objective's own `heldout` hook: pairwise accuracy (reward), NLL per
  token and perplexity against the base model's (sft), else the objective's loss and metrics (for
  DPO the implicit reward accuracy and margin; for KTO the rewards and z0).
- With `generation` set (online flows fill it in; offline flows may set it): the trained policy's
  samples on held-out prompts, scored like the round did, with the KL to the reference; with
  `compare_base`, round 0 also samples the base on the same prompts and seeds, and every round
  reports its paired gain over those base samples (later rounds read them from round 0's table).
- With `controllability` (Quark, NLF): the reward of samples drawn under each control, and the
  teacher-forced conditioning probe on the base samples and the pool (services/conditioning_probe).
The table holds the samples when there are any, else one row per held-out record; the metrics go to
the manifest and the report.
"""

from __future__ import annotations

import pyarrow as pa

from stages.services.annotation import Steps, mean_known
from stages.config import EvaluateConfig, TrainConfig
from stages.pipeline.context import StageOutput, stage
from stages.pipeline.errors import BadInput
from stages.pipeline.seeds import seeded_unit
from stages.services import conditioning_probe as P
from stages.services import sample_metrics as M
from stages.services.generation import generate_hf
from stages.services.models import load_causal_lm, load_model_for, load_tokenizer, resolve_model
from stages.services.scoring import sequence_logps
from stages.services.training_setup import attach_reference, pool_rows, prepare
from stages.training.objectives import make_objective


def heldout_prompts(table, seed: int) -> list[dict]:
    """The distinct held-out prompts (a dataset of several rows a prompt, such as a pool of samples
    or of pairs, gives each once: the bootstrap's unit is a prompt), in a seeded order of the prompt
    text alone. So every flow whose held-out split holds the same openings, online or offline on a
    pool of them, evaluates the same first `max_prompts` in the same order and, with the same seed,
    pairs with the same base samples."""
    first: dict[str, dict] = {}
    for r in table.to_pylist():
        if r["split"] == "heldout":
            first.setdefault(r["prompt_id"], r)
    return sorted(first.values(), key=lambda r: seeded_unit(seed, "evaluate\x00" + r["prompt"]))


def generate_and_score(ctx, cfg: EvaluateConfig, model_path, train_cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Sample held-out prompts from the trained policy, score them like the round did, and measure
    the KL to the reference on those samples (log pi(y) - log ref(y))."""
    prompts = heldout_prompts(ctx.inputs["load_prompts"].table(), ctx.seed)
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
    if not prompts:
        raise BadInput("evaluate: no held-out prompts (raise load_prompts.heldout_fraction)")
    k = cfg.samples_per_prompt
    # The policy samples in float32 whatever sample.dtype says: the KL needs its float32 log-probs
    # (a bf16 sampler's are ~0.05 nats a sequence off, sd 0.3), and recording them while sampling
    # costs less than a bf16 sampler and a float32 rescoring pass (SmolLM2, 400 samples: 47 s, 72 s).
    gen_cfg = cfg.generation.model_copy(update={"n": k, "dtype": "float32"})
    texts = [r["prompt"] for r in prompts]
    steps = Steps(cfg.annotate.steps if cfg.annotate else [])
    generated = generate_hf(model_path, texts, gen_cfg, ctx.heldout_seed, ctx.log)
    rows = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "sample_index": i, **g}
            for r, gens in zip(prompts, generated) for i, g in enumerate(gens)]
    row_prompts = [r["prompt"] for r in rows]
    scores, _ = steps(row_prompts, [r["completion"] for r in rows], "evaluate.annotate", feedback=False)
    prompt_scores = M.per_prompt_means(scores, k)  # the bootstrap's unit: a prompt
    ref_path = resolve_model(train_cfg.reference_model or train_cfg.model, "train.reference_model")
    # The reference sees the unconditioned prompt (the KL convention of Quark / NLF) and the sampled tokens.
    ref = sequence_logps(ref_path, [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
    for r, sc, lr in zip(rows, scores, ref):
        r.update({"score": sc, "reference_logprob": lr, "kl": r["policy_logprob"] - lr})
    metrics = {}
    if cfg.compare_base and steps.steps:
        if ctx.round == 0:
            base_scores = sample_base(ctx, cfg, gen_cfg, train_cfg, texts, rows, steps)
        else:
            base_scores = round_0_base_scores(ctx, rows)
        if base_scores is not None:
            metrics |= base_comparison(prompt_scores, M.per_prompt_means(base_scores, k), ctx.seed)
    kls = [r["kl"] for r in rows]
    metrics |= {**with_interval("mean_reward", prompt_scores, ctx.seed),
                **{f"reward_{q}": v for q, v in M.quantiles(scores).items()},
                **with_interval("kl_to_reference", M.per_prompt_means(kls, k), ctx.seed),
                "perplexity": M.perplexity(ref, [r["completion_tokens"] for r in rows]),
                **{f"distinct_{n}": M.distinct_n([r["completion_ids"] for r in rows], n) for n in (1, 2, 3)},
                "mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / len(rows),
                "truncated_fraction": sum(r["truncated"] for r in rows) / len(rows), "prompts": len(prompts),
                "samples": len(rows),
                "examples": [{"prompt": r["prompt"], "completion": r["completion"], "score": r["score"]}
                             for r in rows[: cfg.samples_to_show]]}
    if cfg.controllability:
        metrics |= controllability(ctx, cfg, model_path, texts[: cfg.controllability_prompts], steps)
        metrics |= conditioning_probe(ctx, cfg, model_path, train_cfg, rows)
    return rows, metrics


def sample_base(ctx, cfg: EvaluateConfig, gen_cfg, train_cfg: TrainConfig, texts, rows, steps) -> list:
    """Round 0: the plain base policy on the same prompts with the same sampling seeds (a paired
    comparison, and one baseline common to every flow on these prompts), unconditioned because the
    base never learnt the conditioning (it would read a Quark token as ordinary text). Its samples
    and scores go into `rows` (base_completion, base_score) for later rounds to pair with."""
    base_path = resolve_model(train_cfg.model, "train.model")
    # The base needs no log-probs: it samples in the configured dtype.
    base_cfg = gen_cfg.model_copy(update={"conditioning": "none", "suppress_tokens": [], "dtype": cfg.generation.dtype})
    base = [g for gens in generate_hf(base_path, texts, base_cfg, ctx.heldout_seed, ctx.log) for g in gens]
    scores, _ = steps([r["prompt"] for r in rows], [g["completion"] for g in base], "evaluate.annotate", feedback=False)
    for r, g, sc in zip(rows, base, scores):
        r.update({"base_completion": g["completion"], "base_completion_ids": g["completion_ids"], "base_score": sc})
    return scores


def round_0_base_scores(ctx, rows: list[dict]) -> list | None:
    """Later rounds: round 0's base samples of the same prompts and sample indices (the held-out
    seed is every round's), copied into `rows`, and their scores in rows' order; None where round 0
    sampled no base."""
    first = ctx.inputs.get("evaluate")  # round 0's own artifact ("evaluate@0"; none in round 0)
    if first is None:
        return None
    table = first.table()
    if "base_score" not in table.column_names:
        return None
    keys = zip(table.column("prompt_id").to_pylist(), table.column("sample_index").to_pylist())
    ids = (table.column("base_completion_ids").to_pylist() if "base_completion_ids" in table.column_names
           else [None] * table.num_rows)
    base = dict(zip(keys, zip(table.column("base_completion").to_pylist(), ids, table.column("base_score").to_pylist())))
    missing = [r for r in rows if (r["prompt_id"], r["sample_index"]) not in base]
    if missing:
        raise BadInput(f"evaluate: round 0's base samples lack held-out prompt {missing[0]['prompt_id']!r} "
                       f"(sample {missing[0]['sample_index']}); re-run round 0's evaluate")
    for r in rows:
        r["base_completion"], r["base_completion_ids"], r["base_score"] = base[(r["prompt_id"], r["sample_index"])]
    return [r["base_score"] for r in rows]


def base_comparison(prompt_scores: list, base_prompt_scores: list, seed: int) -> dict:
    """The base's mean reward with its interval, and the policy's gain over it: the mean of the
    per-prompt differences with their bootstrap interval (paired)."""
    return {**with_interval("base_mean_reward", base_prompt_scores, seed),
            **with_interval("reward_gain", M.paired_differences(prompt_scores, base_prompt_scores), seed)}


def with_interval(name: str, values: list, seed: int) -> dict:
    """{name: mean, name_ci_low, name_ci_high}: the bootstrap 95% interval over prompts (one value,
    or the mean of its samples, each)."""
    out = {name: mean_known(values)}
    ci = M.bootstrap_ci(values, seed)
    if ci:
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = ci
    return out


def controllability(ctx, cfg: EvaluateConfig, model_path, texts: list[str], steps) -> dict:
    """The mean reward of samples drawn with each control (best first): a controllable policy's
    rewards fall in that order, which `controllability` (the rank correlation) measures: 1 is
    perfectly ordered, 0 no control; and `control_spread`, best minus worst control, paired over
    prompts (the same sampling seeds), with its interval."""
    key = "control_token" if cfg.generation.conditioning == "quark_best" else "feedback"
    per_control = []
    for c in cfg.controls:
        gen_cfg = cfg.generation.model_copy(update={"n": 1, key: c})
        samples = [g[0] for g in generate_hf(model_path, texts, gen_cfg, ctx.heldout_seed, ctx.log)]
        scores, _ = steps(texts, [g["completion"] for g in samples], "evaluate.annotate", feedback=False)
        per_control.append(scores)
    means = [mean_known(scores) for scores in per_control]
    out = {f"reward_with_control_{k}": m for k, m in enumerate(means)}
    out |= with_interval("control_spread", M.paired_differences(per_control[0], per_control[-1]), ctx.seed)
    known = [(k, m) for k, m in enumerate(means) if m is not None]
    rho = M.spearman([-k for k, _ in known], [m for _, m in known])
    out["controllability"] = rho
    ctx.log.info("evaluate: reward by control (best first) %s; rank correlation %s",
                 ", ".join("-" if m is None else f"{m:.3f}" for m in means), "-" if rho is None else f"{rho:.2f}")
    return out


def conditioning_probe(ctx, cfg: EvaluateConfig, model_path, train_cfg: TrainConfig, rows: list[dict]) -> dict:
    """The teacher-forced conditioning probe (services/conditioning_probe): on the base samples of
    the held-out prompts, whether best-vs-worst control ranks pairs as the annotator does
    (`conditioning_pairwise`, chance 0.5), and on the pool's training records whether a sample's
    own control is its likeliest (`conditioning_match`, chance `conditioning_match_chance`)."""
    objective = make_objective(train_cfg)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path).eval()
    objective.prepare_model(model, tokenizer, [], ctx.seed)  # the Quark vocabulary: tokens already there
    batch = max(cfg.batch_size, 32)  # scoring only: short sequences, no gradients
    pairs, scored = P.heldout_probe(model, tokenizer, objective, P.base_records(tokenizer, rows), cfg.controls,
                                    cfg.probe_min_gap, batch)
    match, chance = P.pool_match(model, tokenizer, objective, pool_rows(ctx, "train"), cfg.controls,
                                 cfg.probe_records, ctx.seed, batch)
    out = {**with_interval("conditioning_pairwise", pairs, ctx.seed), "conditioning_pairs": len(pairs),
           **with_interval("conditioning_match", match, ctx.seed), "conditioning_match_records": len(match),
           "conditioning_match_chance": chance}
    show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    ctx.log.info("evaluate: conditioning probe: held-out pairs %s (%d pairs, %d samples scored), match on trained "
                 "samples %s (chance %s)", show(out["conditioning_pairwise"]), len(pairs), scored,
                 show(out["conditioning_match"]), show(chance))
    return out


def objective_metrics(ctx, cfg: EvaluateConfig, train_cfg: TrainConfig, rows: list[dict]) -> tuple[pa.Table, dict]:
    """The trained model on held-out pool records, by its objective's `heldout` hook (and the base
    model's, for objectives that compare with it)."""
    objective, model, tokenizer = prepare(train_cfg, rows, ctx.seed, model_path=ctx.inputs["train"].model_dir(),
                                          training=False)
    ctx.log.info("evaluate: %s on %d held-out records", train_cfg.objective, len(rows))
    attach_reference(objective, train_cfg.model_copy(update={"lora": None}), rows, model)
    model.eval()
    scored, metrics = objective.heldout(model, tokenizer, rows, cfg.batch_size)
    if objective.compare_base_heldout:
        base_path = resolve_model(train_cfg.model, "train.model")
        base = load_model_for(objective.model_kind, base_path, load_tokenizer(base_path)).eval()
        before, base_metrics = objective.heldout(base, tokenizer, rows, cfg.batch_size)
        for r, b in zip(scored, before):
            r.update({f"base_{k}": v for k, v in b.items() if k != "prompt_id"})
        metrics |= {f"base_{k}": v for k, v in base_metrics.items()}
    ctx.log.info("evaluate: %s", objective.summary(metrics))
    return pa.Table.from_pylist(scored), {**metrics, "records": len(scored)}


@stage("evaluate", version="12", inputs=("build_pool", "reference", "train", "load_prompts@0", "evaluate@0"))
def run(ctx, cfg: EvaluateConfig) -> StageOutput:
    train_cfg = TrainConfig.model_validate(ctx.inputs["train"].manifest["config"])
    rows = pool_rows(ctx, "heldout")
    rows = rows[: cfg.max_records] if cfg.max_records else rows
    if cfg.generation is None and not rows:
        raise BadInput("evaluate: the pool has no held-out records (raise load_prompts.heldout_fraction)")
    table, metrics = None, {}
    if rows:
        table, metrics = objective_metrics(ctx, cfg, train_cfg, rows)
    if cfg.generation is not None:
        scored, generated = generate_and_score(ctx, cfg, ctx.inputs["train"].model_dir(), train_cfg)
        ctx.log.info("evaluate: held-out mean reward %s, KL to reference %.3f nats",
                     f"{generated['mean_reward']:.4f}" if generated["mean_reward"] is not None else "-",
                     generated["kl_to_reference"])
        table, metrics = pa.Table.from_pylist(scored), {**metrics, **generated}
    return StageOutput(table, metrics)
