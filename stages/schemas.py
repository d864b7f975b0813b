"""The record format every objective trains on (one Arrow schema, validated at stage boundaries).

- prompt_id, prompt, split ("train" / "heldout")
- generation1: the completion (SFT), the preferred text (pairs) or the sample (pointwise, RL)
- generation2: the rejected text of a pair, else null
- generation{1,2}_reward: scores where they exist, else null
- generation{1,2}_weight: per-sample weights (default 1.0); every loss multiplies by them
"""

from __future__ import annotations

import pyarrow as pa

from stages.errors import BadInput

RECORDS = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("generation1", pa.string()),
    ("generation2", pa.string()),
    ("generation1_reward", pa.float64()),
    ("generation2_reward", pa.float64()),
    ("generation1_weight", pa.float64()),
    ("generation2_weight", pa.float64()),
    ("split", pa.string()),
])

DEFAULTS = {"generation2": None, "generation1_reward": None, "generation2_reward": None,
            "generation1_weight": 1.0, "generation2_weight": 1.0}


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
