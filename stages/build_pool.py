"""build_pool: turn prompts (or annotated samples) into training records (see stages/schemas.py).

- sft: prompt -> completion.
- reward_pairs: texts paired so that their scores differ by at least `min_score_gap`; the
  higher-scored text is generation1 (preferred). Each text is used once; pairing follows a seeded
  hash order, so it is stable across runs. The prompt is empty: the reward model scores whole texts.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from stages.config import BuildPoolConfig
from stages.errors import BadInput
from stages.schemas import check_columns, records_table

NAME = "build_pool"
VERSION = "1"
INPUTS = ("load_prompts",)


def _order(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def sft_records(rows: list[dict]) -> list[dict]:
    out = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "generation1": r["completion"], "split": r["split"]}
           for r in rows if r["completion"]]
    if not out:
        raise BadInput("build_pool: kind 'sft' needs prompts with a completion; none has one "
                       "(map a column to 'completion' in load_prompts.columns)")
    return out


def reward_pairs(rows: list[dict], min_gap: float, seed: int) -> list[dict]:
    scored = [r for r in rows if r["score"] is not None]
    if not scored:
        raise BadInput("build_pool: kind 'reward_pairs' needs a score per text; none has one "
                       "(map a column to 'score' in load_prompts.columns)")
    pairs, waiting = [], []
    for r in sorted(scored, key=lambda r: _order(seed, r["prompt_id"])):
        match = next((w for w in waiting if abs(w["score"] - r["score"]) >= min_gap), None)
        if match is None:
            waiting.append(r)
            continue
        waiting.remove(match)
        hi, lo = (r, match) if r["score"] > match["score"] else (match, r)
        text = lambda x: " ".join(filter(None, [x["prompt"], x["completion"]]))  # noqa: E731
        pairs.append({"prompt_id": f"{hi['prompt_id']}-{lo['prompt_id']}", "prompt": "",
                      "generation1": text(hi), "generation2": text(lo),
                      "generation1_reward": hi["score"], "generation2_reward": lo["score"], "split": r["split"]})
    return pairs


def run(ctx, cfg: BuildPoolConfig):
    from stages.runner import StageOutput

    prompts = ctx.inputs["load_prompts"].table()
    check_columns(prompts, {"prompt_id": pa.string(), "prompt": pa.string(), "split": pa.string()}, "build_pool input")
    records = []
    for split in ("train", "heldout"):
        rows = [r for r in prompts.to_pylist() if r["split"] == split]
        if not rows:
            continue
        made = sft_records(rows) if cfg.kind == "sft" else reward_pairs(rows, cfg.min_score_gap, ctx.seed)
        cap = cfg.max_records if split == "train" else (cfg.heldout_max_records or cfg.max_records)
        records.extend(made[:cap] if cap else made)
    if not any(r["split"] == "train" for r in records):
        raise BadInput(f"build_pool: no training records of kind '{cfg.kind}' could be built")
    table = records_table(records)
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "heldout")}
    ctx.log.info("build_pool: %d %s records (%d train / %d held out)", len(records), cfg.kind, counts["train"], counts["heldout"])
    return StageOutput(table, {f"records_{k}": v for k, v in counts.items()})
