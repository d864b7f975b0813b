"""The record format every objective trains on: one Arrow schema, validated at stage boundaries.

- prompt_id, prompt, split ("train" / "heldout")
- generation1: the completion (SFT), the preferred text of a pair, or the sample (pointwise, RL)
- generation2: the rejected text of a pair, else null
- generation{1,2}_reward: scores where they exist, else null
- generation{1,2}_weight: per-sample weights (default 1.0); every loss multiplies by them
- desirable: the pointwise label (KTO), else null
- control: a Quark reward-quantile token prefixed to the prompt, else null
- feedback: natural-language feedback the prompt is conditioned on (NLF), else null
- control2 / feedback2: Quark's / NLF's partner sample (generation2, a sample of the same prompt)
  and its condition, for the pairwise contrast; else null
- kl_generation: another record's generation1, paired with this prompt (KTO's reference point)
- prompt_ids, generation1_ids, generation2_ids, kl_generation_ids: the token ids of the prompt
  (unconditioned) and of each generation as the policy sampled them, else null. Where a record has
  them, every stage scores and trains these ids (stages/data/tokens.py); text is tokenised otherwise.
- generation1_logps: log p of each generation1_ids token under the policy that sampled it (GRPO's
  ratio), else null

The reference stage adds, keyed by the pool and the reference model:
- reference_logp1 / reference_logp2 / reference_kl_logp: summed completion log-probs
- reference_token_logps1: per-token log-probs of generation1 (Quark/NLF cached KL), if asked for
"""

from __future__ import annotations

import pyarrow as pa

from stages.pipeline.errors import BadInput

RECORDS = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("generation1", pa.string()),
    ("generation2", pa.string()),
    ("generation1_reward", pa.float64()),
    ("generation2_reward", pa.float64()),
    ("generation1_weight", pa.float64()),
    ("generation2_weight", pa.float64()),
    ("desirable", pa.bool_()),
    ("control", pa.string()),
    ("feedback", pa.string()),
    ("control2", pa.string()),
    ("feedback2", pa.string()),
    ("kl_generation", pa.string()),
    ("split", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("generation1_ids", pa.list_(pa.int32())),
    ("generation2_ids", pa.list_(pa.int32())),
    ("kl_generation_ids", pa.list_(pa.int32())),
    ("generation1_logps", pa.list_(pa.float32())),
])

REFERENCE_COLUMNS = pa.schema([
    ("reference_logp1", pa.float64()),
    ("reference_logp2", pa.float64()),
    ("reference_kl_logp", pa.float64()),
    ("reference_token_logps1", pa.list_(pa.float32())),
])

# A record's columns default to null, its weights to 1.0.
DEFAULTS = {name: None for name in RECORDS.names} | {"generation1_weight": 1.0, "generation2_weight": 1.0}


def records_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**DEFAULTS, **r} for r in rows], schema=RECORDS)


def check_columns(table: pa.Table, required: dict[str, pa.DataType], where: str) -> None:
    """A missing or mistyped column is a bad-input error that names it."""
    for name, kind in required.items():
        if name not in table.column_names:
            raise BadInput(f"{where}: missing column '{name}'")
        actual = table.schema.field(name).type
        if actual != kind and not (pa.types.is_large_string(actual) and kind == pa.string()):
            raise BadInput(f"{where}: column '{name}' has type {actual}, expected {kind}")


def check_non_null(rows: list[dict], columns: list[str], where: str) -> None:
    for i, r in enumerate(rows):
        for c in columns:
            if r.get(c) is None:
                raise BadInput(f"{where}: record {i} ({r.get('prompt_id')}) has no '{c}'")


def by_prompt(rows: list[dict]) -> dict[str, list[int]]:
    """Row indices grouped by prompt_id, in order of first appearance (and within a group, of rows)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["prompt_id"], []).append(i)
    return groups
