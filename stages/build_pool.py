"""build_pool: turn prompts (or annotated samples) into training records (stages/data/schemas.py).

Kinds (config `build_pool.kind`):
- sft: prompt -> completion; every completion, or each prompt's best-scored one (`sft_selection`).
- reward_pairs: whole texts paired so that their scores differ by at least `min_score_gap`; the
  higher-scored text is generation1. Each text is used once. The prompt is empty: the reward
  model scores whole texts.
- pairs: chosen (generation1) vs rejected (generation2): given by the dataset, or from the scored
  completions of each prompt: best vs worst, or all pairs (`pairing`), when the scores differ by
  at least `min_score_gap`. generation1 is always the preferred one (the schema's convention);
  the two are scored in separate sequences, so their position carries no signal.
Online rounds read the reweight (or annotate) stage's samples instead of load_prompts; each
sample's weight becomes its generation's weight.
- pointwise: one record per completion with a desirable flag (chosen -> desirable, rejected ->
  undesirable; or score > threshold). Each record also gets `kl_generation`, the generation of
  the next record in a seeded order, for KTO's reference point.
- quark: each completion gets the control token of its reward quantile (equal-size bins by mid-rank,
  best = 0; a prompt with fewer samples than bins spreads them from the best bin to the worst).
- nlf: each completion gets feedback text (one phrase per reward quantile, best first).
  Quark's and NLF's records also carry a partner (generation2, control2 / feedback2): a sample
  of the same prompt under another condition, for the pairwise contrast (`with_partners`).
- rl: scored completions grouped by prompt, the score as generation1_reward.
Orders follow a seeded hash, so pools are stable across runs.
"""

from __future__ import annotations

import statistics

import pyarrow as pa

from stages.config import BuildPoolConfig
from stages.data.pool import pool_samples, quantile_bins
from stages.pipeline.context import StageOutput, stage
from stages.pipeline.errors import BadInput
from stages.pipeline.seeds import seeded_hash
from stages.data.schemas import by_prompt, check_columns, records_table

def _need(rows: list[dict], column: str, kind: str, hint: str) -> list[dict]:
    have = [r for r in rows if r.get(column) is not None]
    if not have:
        raise BadInput(f"build_pool: kind '{kind}' needs a '{column}' per row; none has one ({hint})")
    return have


def _text(x: dict) -> str:
    """Prompt and completion as one text, joined as the data gives them (no separator invented)."""
    return (x["prompt"] or "") + (x["completion"] or "")


def _prompt(r: dict) -> dict:
    """A record's prompt fields, with the sampled prompt's token ids where the row has them."""
    return {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "prompt_ids": r.get("prompt_ids"), "split": r["split"]}


def _gen(r: dict, k: int | str = 1) -> dict:
    """generation{k} (text, token ids as sampled, weight; for generation1 also the sampling
    policy's per-token log-probs) of a sample row."""
    out = {f"generation{k}": r["completion"], f"generation{k}_ids": r.get("completion_ids"),
           f"generation{k}_weight": _w(r)}
    if k == 1:
        out["generation1_logps"] = r.get("completion_logps")
    return out


def _w(r: dict) -> float:
    """The reweight stage's weight of a sample (1.0 when there was no reweighting)."""
    return r.get("weight") if r.get("weight") is not None else 1.0


def sft_records(rows, cfg, seed):
    have = _need(rows, "completion", "sft", "map a column to 'completion' in load_prompts.columns")
    empty = [r for r in have if not r["completion"].strip() and not r.get("completion_ids")]
    if empty:  # it would train the prompt to end at once
        raise BadInput(f"build_pool: {len(empty)} of {len(have)} rows have an empty completion (first: prompt "
                       f"{empty[0]['prompt']!r}); drop them (load_prompts.min_completion_words: 1) or fix the data")
    if cfg.sft_selection == "best":
        scored = _need(have, "score", "sft with sft_selection best", "map a column to 'score' in load_prompts.columns")
        have = [_best_first([scored[i] for i in idx], seed)[0] for idx in by_prompt(scored).values()]
    return [{**_prompt(r), **_gen(r)} for r in have]


def _best_first(group: list[dict], seed: int) -> list[dict]:
    """One prompt's scored completions, highest score first; ties in a seeded order."""
    return sorted(group, key=lambda r: (-r["score"], seeded_hash(seed, r["completion"] or "")))


def reward_pairs(rows, cfg, seed):
    pairs, waiting = [], []
    scored = _need(rows, "score", "reward_pairs", "map a column to 'score' in load_prompts.columns")
    for r in sorted(scored, key=lambda r: seeded_hash(seed, _text(r))):
        match = next((w for w in waiting if abs(w["score"] - r["score"]) >= cfg.min_score_gap), None)
        if match is None:
            waiting.append(r)
            continue
        waiting.remove(match)
        hi, lo = (r, match) if r["score"] > match["score"] else (match, r)
        pairs.append({"prompt_id": f"{hi['prompt_id']}-{lo['prompt_id']}", "prompt": "",
                      "generation1": _text(hi), "generation2": _text(lo),
                      "generation1_reward": hi["score"], "generation2_reward": lo["score"], "split": r["split"]})
    return pairs


def preference_pairs(rows, cfg, seed):
    given = [r for r in rows if r.get("rejected") is not None and r.get("completion") is not None]
    if given:
        return [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "generation1": r["completion"],
                 "generation2": r["rejected"], "split": r["split"]} for r in given]
    scored = _need(rows, "score", "pairs", "give a dataset with chosen/rejected, or completions with scores")
    out = []
    for pid, idx in by_prompt(scored).items():
        ranked = _best_first([scored[i] for i in idx], seed)
        if cfg.pairing == "best_worst":
            candidates = [(ranked[0], ranked[-1])] if len(ranked) > 1 else []
        else:
            candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
        for hi, lo in candidates:
            if hi["score"] - lo["score"] >= cfg.min_score_gap:
                out.append({**_prompt(hi), **_gen(hi, 1), **_gen(lo, 2), "generation1_reward": hi["score"],
                            "generation2_reward": lo["score"]})
    return out


def _threshold(scores: list[float], cfg) -> float:
    if cfg.desirable_threshold == "mean":
        return statistics.fmean(scores)
    if cfg.desirable_threshold == "median":
        return statistics.median(scores)
    return float(cfg.desirable_threshold)


def pointwise(rows, cfg, seed):
    given = [r for r in rows if r.get("rejected") is not None and r.get("completion") is not None]
    if given:
        out = [{**_prompt(r), "generation1": g, "desirable": d}
               for r in given for g, d in ((r["completion"], True), (r["rejected"], False))]
    else:
        scored = _need(rows, "score", "pointwise", "give chosen/rejected pairs, or completions with scores")
        scored = [r for r in scored if r.get("completion")]
        cut = _threshold([r["score"] for r in scored], cfg)
        out = [{**_prompt(r), **_gen(r), "generation1_reward": r["score"], "desirable": r["score"] > cut}
               for r in scored]
    out.sort(key=lambda r: seeded_hash(seed, r["prompt_id"] + r["generation1"]))
    for i, r in enumerate(out):  # KTO's mismatched completion: the next record's, cyclically
        other = out[(i + 1) % len(out)]
        r["kl_generation"], r["kl_generation_ids"] = other["generation1"], other.get("generation1_ids")
    return out


def _quantile_bins(rows, cfg) -> list[tuple[dict, int]]:
    """(row, bin): equal-size bins by score within `quantile_scope`, best bin 0, by the data pool's
    mid-rank rule (stages/data/pool.py). Rows of the data pool come with their bin (recomputed over
    the whole pool)."""
    scored = [r for r in _need(rows, "score", cfg.kind, "completions need scores (annotate, or a 'score' column)")
              if r.get("completion")]
    if scored and all(r.get("quantile") is not None for r in scored):
        return [(r, r["quantile"]) for r in scored]
    scopes = [r["prompt_id"] if cfg.quantile_scope == "per_prompt" else "" for r in scored]
    return list(zip(scored, quantile_bins(scopes, [r["score"] for r in scored], cfg.quantiles)))


def with_partners(records: list[dict], condition: str, seed: int, min_gap: float = 0.0) -> list[dict]:
    """Each conditioned record's partner (generation2, its reward and its condition as
    `<condition>2`): the sample of the same prompt under a different condition whose reward is
    farthest from its own, ties in a seeded order; none when every sibling shares its condition
    or none is at least `min_gap` away (a near-tie would teach the conditions the noise that tells
    two equally good samples apart). The pairwise contrast of Quark and NLF (`pair_contrast_coef`)
    trains on the two."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["split"], r["prompt_id"]), []).append(r)
    out = []
    for r in records:
        others = [o for o in groups[(r["split"], r["prompt_id"])]
                  if o[condition] != r[condition] and o.get("generation1_reward") is not None
                  and r.get("generation1_reward") is not None
                  and abs(o["generation1_reward"] - r["generation1_reward"]) >= min_gap]
        if not others:
            out.append(r)
            continue
        o = max(others, key=lambda o: (abs(o["generation1_reward"] - r["generation1_reward"]),
                                       seeded_hash(seed, r["generation1"] + "|" + o["generation1"])))
        out.append({**r, "generation2": o["generation1"], "generation2_ids": o.get("generation1_ids"),
                    "generation2_weight": o.get("generation1_weight", 1.0),
                    "generation2_reward": o["generation1_reward"], f"{condition}2": o[condition]})
    return out


def quark(rows, cfg, seed):
    made = [{**_prompt(r), **_gen(r), "generation1_reward": r["score"], "control": cfg.control_token.format(k=k)}
            for r, k in _quantile_bins(rows, cfg)]
    return with_partners(made, "control", seed, cfg.partner_min_gap)


def nlf(rows, cfg, seed):
    """An annotator's own feedback when the sample has it; otherwise the phrase of its reward quantile."""
    if len(cfg.feedback_phrases) != cfg.quantiles:
        raise BadInput(f"build_pool.feedback_phrases: {len(cfg.feedback_phrases)} phrases for {cfg.quantiles} quantiles")
    record = lambda r, fb: {**_prompt(r), **_gen(r), "generation1_reward": r.get("score"), "feedback": fb}  # noqa: E731
    given = [record(r, r["feedback"]) for r in rows if r.get("feedback") and r.get("completion")]
    rest = [r for r in rows if not r.get("feedback")]
    binned = [record(r, cfg.feedback_phrases[k]) for r, k in _quantile_bins(rest, cfg)] if rest else []
    return with_partners(given + binned, "feedback", seed, cfg.partner_min_gap)


def rl(rows, cfg, seed):
    scored = _need(rows, "score", "rl", "completions need rewards (annotate, or a 'score' column)")
    return [{**_prompt(r), **_gen(r), "generation1_reward": r["score"]} for r in scored if r.get("completion")]


BUILDERS = {"sft": sft_records, "reward_pairs": reward_pairs, "pairs": preference_pairs, "pointwise": pointwise,
            "quark": quark, "nlf": nlf, "rl": rl}


def _drawn_from_pool(ctx) -> pa.Table:
    """The data pool's training draw, as sample rows (its reward is their score, its quantile their
    bin), joined with the samples stored by the pool of the round that drew each."""
    pool = ctx.inputs["data_pool"]
    drawn = pool.table().filter(pa.compute.field("drawn"))
    earlier = [u for k, u in ctx.inputs.items() if k.startswith("data_pool@")]
    drawn = pool_samples(drawn, [*earlier, pool])
    return drawn.rename_columns(["score" if c == "reward" else c for c in drawn.column_names])


@stage("build_pool", version="7", inputs=("load_prompts@0", "annotate", "reweight", "data_pool", "data_pool@earlier"))
def run(ctx, cfg: BuildPoolConfig) -> StageOutput:
    if "data_pool" in ctx.inputs:
        prompts = _drawn_from_pool(ctx)
    else:
        source = ctx.inputs.get("reweight") or ctx.inputs.get("annotate") or ctx.inputs["load_prompts"]
        prompts = source.table()
    check_columns(prompts, {"prompt_id": pa.string(), "prompt": pa.string(), "split": pa.string()}, "build_pool input")
    all_rows = prompts.to_pylist()
    records = []
    for split in ("train", "heldout"):
        rows = [r for r in all_rows if r["split"] == split]
        if not rows:
            continue
        made = BUILDERS[cfg.kind](rows, cfg, ctx.seed)
        made.sort(key=lambda r: seeded_hash(ctx.seed, r["prompt_id"] + (r.get("generation1") or "")))  # caps pick at random
        cap = cfg.max_records if split == "train" else (cfg.heldout_max_records or cfg.max_records)
        records.extend(made[:cap] if cap else made)
    if not any(r["split"] == "train" for r in records):
        raise BadInput(f"build_pool: no training records of kind '{cfg.kind}' could be built")
    table = records_table(records)
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "heldout")}
    ctx.log.info("build_pool: %d %s records (%d train / %d held out)", len(records), cfg.kind, counts["train"], counts["heldout"])
    metrics = {f"records_{k}": v for k, v in counts.items()}
    if cfg.kind == "pointwise":
        metrics["desirable_fraction"] = sum(bool(r["desirable"]) for r in records) / len(records)
    return StageOutput(table, metrics)
