"""The data pool of Quark and NLF rounds: every sample kept so far, one Arrow table per round.

Round k's pool is round k-1's pool after the drop policy, plus round k's scored samples; then the
reward quantiles are recomputed over the whole pool and the samples to train on are drawn. All of it
is one DuckDB query over Arrow tables (no Python loop over rows), so a million pooled samples take
seconds, and the result is a plain table anyone can query (README shows a DuckDB query over every
round's pool).

The policy, per prompt and split:
- `drop`: the fraction of the previous pool's samples dropped each round, oldest first (1.0 keeps
  only this round's samples: on-policy; 0.0 keeps everything, as Quark does);
- `max_age`: samples drawn more than `max_age - 1` rounds ago are dropped (None: no limit);
- `max_per_prompt`: at most this many samples per prompt, the newest kept (None: no cap).
Ties in age are broken by a seeded order (DuckDB's hash of the seed and the sample's key), so a
re-run keeps the same samples.

Quantiles (`quantile`, Quark's token index: 0 = the best rewards) are equal-size bins of the
reward's rank over the pool (`global`) or within each prompt (`per_prompt`), by mid-rank: tied
rewards share a bin, all-equal rewards land in the middle bin, and a prompt with fewer samples than
bins spreads them over the range instead of filling the top bins first.

The draw (`drawn`): per prompt and quantile, `draw_per_quantile` samples, untruncated ones first,
then in the seeded order (None: every sample is drawn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# What a sample carries into the pool; `round`, `quantile` and `drawn` are the pool's own.
SAMPLE_COLUMNS = {
    "prompt_id": pa.string(), "prompt": pa.string(), "split": pa.string(), "sample_index": pa.int32(),
    "completion": pa.string(), "truncated": pa.bool_(), "checkpoint": pa.string(),
    "reward": pa.float64(), "feedback": pa.string(), "weight": pa.float64(),
    "conditioning": pa.string(), "prompt_ids": pa.list_(pa.int32()), "completion_ids": pa.list_(pa.int32()),
}
POOL = pa.schema([*SAMPLE_COLUMNS.items(), ("round", pa.int32()), ("quantile", pa.int32()), ("drawn", pa.bool_())])


@dataclass(frozen=True)
class PoolPolicy:
    quantiles: int = 5
    quantile_scope: str = "global"  # or "per_prompt"
    drop: float = 0.0
    max_age: int | None = None
    max_per_prompt: int | None = None
    draw_per_quantile: int | None = None


def samples_table(table: pa.Table, round_: int) -> pa.Table:
    """An annotated (or reweighted) sample table as pool rows of `round_`: `score` becomes
    `reward`; unscored samples are left out; missing optional columns are null."""
    if "score" in table.column_names and "reward" not in table.column_names:
        table = table.rename_columns(["reward" if c == "score" else c for c in table.column_names])
    n = table.num_rows
    cols = {}
    for name, typ in SAMPLE_COLUMNS.items():
        if name in table.column_names:
            cols[name] = table.column(name).cast(typ)
        elif name == "weight":
            cols[name] = pa.array([1.0] * n, typ)
        elif name == "truncated":
            cols[name] = pa.array([False] * n, typ)
        else:
            cols[name] = pa.nulls(n, typ)
    out = pa.table(cols).append_column("round", pa.array([round_] * n, pa.int32()))
    return out.filter(pa.compute.is_valid(out.column("reward")))


def _connect():
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute("SET threads TO 2")  # these machines have two cores; more threads only contend
    return con


def update(previous: pa.Table | None, new: pa.Table, round_: int, policy: PoolPolicy, seed: int) -> pa.Table:
    """Round `round_`'s pool: `previous` (a pool table, or None in the first round) after the drop
    policy, plus `new` (pool rows of this round, see `samples_table`), with quantiles and the draw.

    The windows run over a narrow projection (row id, keys, reward); the wide columns (texts, token
    ids) are filtered once at the end, keeping the pool's order: earlier rounds' samples first, as
    they were, then this round's."""
    base = POOL.remove(POOL.get_field_index("drawn")).remove(POOL.get_field_index("quantile"))
    parts = [previous.select(base.names).cast(base)] if previous is not None else []
    rows = pa.concat_tables([*parts, new.select(base.names).cast(base)])
    narrow = rows.select(["split", "prompt_id", "round", "sample_index", "reward", "truncated"]).append_column(
        "rid", pa.array(range(rows.num_rows), pa.int64()))
    q = int(policy.quantiles)
    scope = "split, prompt_id" if policy.quantile_scope == "per_prompt" else "split"
    age = f"AND {round_} - round < {int(policy.max_age)}" if policy.max_age else ""
    draw = f"AND pick <= {int(policy.draw_per_quantile)}" if policy.draw_per_quantile else ""
    # One window decides what is kept: per prompt, samples in order of age (oldest first, the seeded
    # order within a round); this round's come last, so the first floor(n_old * drop) are the dropped
    # old ones, and a sample is among the newest `max_per_prompt` when its position from the end is.
    keep = f"(round = {round_} OR position > CAST(floor(n_old * {float(policy.drop)} + 1e-9) AS BIGINT))"
    if policy.max_per_prompt:
        keep += f" AND n_all - position < {int(policy.max_per_prompt)}"
    sql = f"""
    WITH keyed AS (
        -- a seeded pseudo-random order of samples, for every tie below (the same on a re-run)
        SELECT *, hash({int(seed)}, prompt_id, round, sample_index) AS ord FROM narrow
        WHERE round = {round_} OR (round < {round_} {age})
    ),
    ordered AS (
        SELECT *,
            row_number() OVER w AS position,
            count(*) FILTER (round < {round_}) OVER p AS n_old,
            count(*) OVER p AS n_all
        FROM keyed
        WINDOW p AS (PARTITION BY split, prompt_id), w AS (PARTITION BY split, prompt_id ORDER BY round, ord)
    ),
    kept AS (SELECT rid, split, prompt_id, reward, truncated, ord FROM ordered WHERE {keep}),
    binned AS (
        -- mid-rank = rank + (ties - 1) / 2, and cume_dist * n = rank + ties - 1
        SELECT rid, split, prompt_id, truncated, ord,
            CAST(least({q} - 1, floor({q} * (
                (rank() OVER r + cume_dist() OVER r * count(*) OVER s - 1) / 2.0)
                / count(*) OVER s)) AS INTEGER) AS from_bottom
        FROM kept
        WINDOW s AS (PARTITION BY {scope}), r AS (PARTITION BY {scope} ORDER BY reward)
    )
    SELECT rid, quantile, (pick > 0 {draw}) AS drawn FROM (
        SELECT rid, CAST({q} - 1 - from_bottom AS INTEGER) AS quantile,
            row_number() OVER (PARTITION BY split, prompt_id, from_bottom ORDER BY truncated, ord) AS pick
        FROM binned)
    """
    con = _connect()
    con.register("narrow", narrow)
    picked = con.sql(sql).to_arrow_table()
    # Scatter the answers back by row id (no sort), then keep the rows in their order: a filter,
    # which copies the wide columns sequentially (a take over them costs far more).
    rid = picked.column("rid").to_numpy()
    kept = np.zeros(rows.num_rows, bool)
    kept[rid] = True
    quantile, drawn = np.zeros(rows.num_rows, np.int32), np.zeros(rows.num_rows, bool)
    quantile[rid] = picked.column("quantile").to_numpy()
    drawn[rid] = picked.column("drawn").to_numpy(zero_copy_only=False)
    out = rows.filter(pa.array(kept))
    return out.append_column("quantile", pa.array(quantile[kept])).append_column("drawn", pa.array(drawn[kept])).cast(POOL)


def summary(pool: pa.Table, round_: int) -> dict:
    """Metrics of a pool for the manifest: its size, this round's share, the draw, per-quantile means."""
    con = _connect()
    con.register("pool", pool)
    size, new, drawn, prompts = con.execute(
        f"SELECT count(*), count(*) FILTER (round = {round_}), count(*) FILTER (drawn), count(DISTINCT prompt_id) FROM pool"
    ).fetchone()
    means = con.execute("SELECT quantile, avg(reward) FROM pool GROUP BY quantile ORDER BY quantile").fetchall()
    oldest = con.execute("SELECT min(round) FROM pool").fetchone()[0]
    return {"pool_samples": size, "new_samples": new, "drawn": drawn, "prompts": prompts, "oldest_round": oldest,
            **{f"mean_reward_q{int(k)}": float(v) for k, v in means}}
