"""The data pool of Quark and NLF rounds: every sample kept so far, one Arrow table per round.

Round k's pool is round k-1's pool after the drop policy, plus round k's scored samples; then the
reward quantiles are recomputed over the whole pool and the samples to train on are drawn.

The pool is narrow: a row is a sample's key (split, prompt id, round, sample index) with what the
policy reads and writes (reward, truncated, weight, quantile, drawn). The sample itself (prompt,
completion, token ids, checkpoint, feedback, conditioning) is stored once, in the round that drew
it (`SAMPLES`, the data_pool artifact's samples.parquet), and joined back by key (`with_samples`).
So a round copies no texts: under Quark's keep-everything policy the pools of k rounds would
otherwise hold every sample k times over. Building a round is three NumPy argsorts over the
narrow columns (no Python loop over rows); 1M pooled samples take well under a second
(benchmarks/bench_pool.py). Both tables are plain Parquet: docs/online-rounds.md joins them with DuckDB.

The policy, per prompt and split:
- `drop`: the fraction of the previous pool's samples dropped each round, oldest first (1.0 keeps
  only this round's samples: on-policy; 0.0 keeps everything, as Quark does);
- `max_age`: samples drawn more than `max_age - 1` rounds ago are dropped (None: no limit);
- `max_per_prompt`: at most this many samples per prompt, the newest kept (None: no cap).
Ties in age are broken by a seeded order (a hash of the seed, the prompt's rank among the pool's
prompt ids, the round and the sample index), so a re-run keeps the same samples.

Quantiles (`quantile`, Quark's token index: 0 = the best rewards) are equal-size bins of the
reward's rank over the pool (`global`) or within each prompt (`per_prompt`), by mid-rank: tied
rewards share a bin, all-equal rewards land in the middle bin, and a prompt with fewer samples than
bins spreads them over the range instead of filling the top bins first. With n samples in scope, a
run of t tied rewards starting at 0-based rank i lands floor(q * (i + t/2) / n) bins from the bottom
(in integers, so no rounding moves a boundary).

The draw (`drawn`): per prompt and quantile, `draw_per_quantile` samples, untruncated ones first,
then in the seeded order (None: every sample is drawn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.pipeline.errors import BadInput

SAMPLES_FILE = "samples.parquet"  # in each round's data_pool artifact, beside the pool (data.parquet)
KEY = ("split", "prompt_id", "round", "sample_index")
# What a sample carries, stored once in the round that drew it.
SAMPLE_COLUMNS = {
    "prompt_id": pa.string(), "prompt": pa.string(), "split": pa.string(), "sample_index": pa.int32(),
    "completion": pa.string(), "truncated": pa.bool_(), "checkpoint": pa.string(),
    "reward": pa.float64(), "feedback": pa.string(), "weight": pa.float64(),
    "conditioning": pa.string(), "prompt_ids": pa.list_(pa.int32()), "completion_ids": pa.list_(pa.int32()),
}
SAMPLES = pa.schema([*SAMPLE_COLUMNS.items(), ("round", pa.int32())])
# A pool row: the key, what the policy reads (reward, truncated; weight rides along for training),
# and what it writes. Split and prompt id are dictionary-encoded: the pool groups by them every
# round, and a pool read back from Parquet keeps the encoding.
_CODED = pa.dictionary(pa.int32(), pa.string())
ENTRY = pa.schema([pa.field(c, _CODED) if c in ("split", "prompt_id") else SAMPLES.field(c)
                   for c in (*KEY, "reward", "truncated", "weight")])
POOL = pa.schema([*ENTRY, ("quantile", pa.int32()), ("drawn", pa.bool_())])


@dataclass(frozen=True)
class PoolPolicy:
    quantiles: int = 5
    quantile_scope: str = "global"  # or "per_prompt"
    drop: float = 0.0
    max_age: int | None = None
    max_per_prompt: int | None = None
    draw_per_quantile: int | None = None


def samples_table(table: pa.Table, round_: int) -> pa.Table:
    """An annotated (or reweighted) sample table as `SAMPLES` rows of `round_`: `score` becomes
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
    return out.filter(pc.is_valid(out.column("reward")))


def duplicate_key(samples: pa.Table) -> tuple | None:
    """A key that more than one sample of the table carries (the join needs them unique), or None."""
    counts = samples.group_by(list(KEY)).aggregate([([], "count_all")])
    dup = counts.filter(pc.greater(counts.column("count_all"), 1))
    return tuple(dup.slice(0, 1).select(list(KEY)).to_pylist()[0].values()) if dup.num_rows else None


# --------------------------------------------------------------------------- vectorised helpers

def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Dense int64 codes of a dictionary-encoded column (one chunk) numbered in sorted order of its
    values (so a code does not depend on where a value first appears), and how many values there are."""
    (encoded,) = column.chunks
    rank = pc.rank(encoded.dictionary, sort_keys="ascending").to_numpy().astype(np.int64) - 1
    return rank[encoded.indices.to_numpy(zero_copy_only=False)], len(encoded.dictionary)


def _mix(*columns: np.ndarray) -> np.ndarray:
    """A 64-bit hash of integer columns, row by row (splitmix64's finaliser after each column)."""
    h = np.zeros(len(columns[0]), np.uint64)
    for c in columns:
        h = h ^ (np.asarray(c).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return h


def _bits(count: int) -> int:
    """The width in bits of the values 0 .. count - 1."""
    return max(1, int(count - 1).bit_length())


def _packed(*fields: tuple[np.ndarray, int], tie: np.ndarray | None = None) -> np.ndarray:
    """One uint64 per row that orders the rows as `fields` do, most significant first (each a column
    of non-negative integers and its width in bits), then by the top bits of `tie` (a hash): one
    argsort of it replaces a lexsort over all the columns, at a fraction of the cost."""
    key, used = np.zeros(len(fields[0][0]), np.uint64), 0
    for values, bits in fields:
        key = (key << np.uint64(bits)) | values.astype(np.uint64)
        used += bits
    if used > 48:  # leave the tie-break at least 16 bits; far beyond any pool (2^24 prompts x 5 bins)
        raise ValueError(f"the pool's sort keys need {used} bits")
    if tie is not None:
        key = (key << np.uint64(64 - used)) | (tie >> np.uint64(used))
    return key


def _position_in_group(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Each row's 0-based position within its group, the rows ordered by `key` (a `_packed` key
    whose most significant field is the group)."""
    perm = np.argsort(key)
    g = group[perm]
    first = np.r_[True, g[1:] != g[:-1]] if len(g) else np.zeros(0, bool)
    start = np.maximum.accumulate(np.where(first, np.arange(len(g)), 0))
    pos = np.empty(len(g), np.int64)
    pos[perm] = np.arange(len(g)) - start
    return pos


def _bins_from_bottom(scope: np.ndarray, n_scopes: int, reward: np.ndarray, q: int) -> np.ndarray:
    """Each row's quantile counted from the worst (0 = the lowest rewards) within its scope, by mid-rank."""
    m = len(reward)
    if m == 0:
        return np.zeros(0, np.int64)
    by_reward = np.argsort(reward)
    r = reward[by_reward]
    dense = np.empty(m, np.int64)  # equal rewards, equal codes, in the rewards' order
    dense[by_reward] = np.cumsum(np.r_[True, r[1:] != r[:-1]]) - 1
    perm = by_reward if n_scopes == 1 else np.argsort(_packed((scope, _bits(n_scopes)), (dense, _bits(m))))
    s, d = scope[perm], dense[perm]
    idx = np.arange(m)
    new_scope = np.r_[True, s[1:] != s[:-1]]
    new_run = new_scope | np.r_[True, d[1:] != d[:-1]]
    scope_start = np.maximum.accumulate(np.where(new_scope, idx, 0))
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0))
    run_len = np.diff(np.r_[np.flatnonzero(new_run), m])[np.cumsum(new_run) - 1]
    scope_len = np.diff(np.r_[np.flatnonzero(new_scope), m])[np.cumsum(new_scope) - 1]
    i = run_start - scope_start
    bins = np.minimum(q - 1, (q * (2 * i + run_len)) // (2 * scope_len))
    out = np.empty(m, np.int64)
    out[perm] = bins
    return out


def quantile_bins(scopes: list, rewards: list[float], quantiles: int) -> list[int]:
    """Quark's quantile of each reward within its scope (0 = the best), by mid-rank, as the pool
    bins them: equal-size bins, equal rewards share a bin, and a scope with fewer rows than bins
    spreads them from the best bin to the worst (4 rows in 5 bins: 0, 1, 3, 4)."""
    if not rewards:
        return []
    codes, n = np.unique(np.asarray(scopes, dtype=object).astype(str), return_inverse=True)
    from_bottom = _bins_from_bottom(n.astype(np.int64), len(codes), np.asarray(rewards, np.float64), int(quantiles))
    return (int(quantiles) - 1 - from_bottom).tolist()


# --------------------------------------------------------------------------- the round's pool

def update(previous: pa.Table | None, new: pa.Table, round_: int, policy: PoolPolicy, seed: int) -> pa.Table:
    """Round `round_`'s pool (`POOL`): `previous` (a pool, or None in the first round) after the drop
    policy, plus `new` (this round's samples: `SAMPLES` or `ENTRY` rows), with quantiles and the draw.
    Rows keep the pool's order: earlier rounds' samples first, as they were, then this round's."""
    parts = [previous.select(ENTRY.names).cast(ENTRY)] if previous is not None else []
    rows = pa.concat_tables([*parts, new.select(ENTRY.names).cast(ENTRY)]).unify_dictionaries().combine_chunks()
    if rows.num_rows == 0:
        return rows.append_column("quantile", pa.array([], pa.int32())).append_column("drawn", pa.array([], pa.bool_()))
    rnd = rows.column("round").to_numpy().astype(np.int64)
    split, n_splits = _codes(rows.column("split"))
    prompt, n_prompts = _codes(rows.column("prompt_id"))
    group = split * n_prompts + prompt  # (split, prompt)
    order = _mix(np.full(len(rnd), seed), prompt, rnd, rows.column("sample_index").to_numpy())

    # What is kept, per prompt: samples in order of age (oldest first, the seeded order within a
    # round); this round's come last, so the first floor(n_old * drop) are the dropped old ones, and
    # a sample is among the newest `max_per_prompt` when its position from the end is.
    alive = rnd <= round_
    if policy.max_age:
        alive &= (rnd == round_) | (round_ - rnd < policy.max_age)
    idx = np.flatnonzero(alive)
    g, r = group[idx], rnd[idx]
    n_groups = n_splits * n_prompts
    pos = _position_in_group(g, _packed((g, _bits(n_groups)), (r, _bits(round_ + 1)), tie=order[idx]))
    n_all = np.bincount(g, minlength=n_groups)
    n_old = np.bincount(g[r < round_], minlength=n_groups)
    keep = (r == round_) | (pos >= np.floor(n_old[g] * float(policy.drop) + 1e-9))
    if policy.max_per_prompt:
        keep &= n_all[g] - pos <= int(policy.max_per_prompt)
    kept = idx[keep]

    q = int(policy.quantiles)
    per_prompt = policy.quantile_scope == "per_prompt"
    scope = group[kept] if per_prompt else split[kept]
    reward = rows.column("reward").to_numpy()[kept]
    from_bottom = _bins_from_bottom(scope, n_groups if per_prompt else n_splits, reward, q)
    drawn = np.ones(len(kept), bool)
    if policy.draw_per_quantile:
        truncated = rows.column("truncated").to_numpy(zero_copy_only=False)[kept]
        cell = group[kept] * q + from_bottom
        pick = _position_in_group(cell, _packed((cell, _bits(n_groups * q)), (truncated, 1), tie=order[kept]))
        drawn = pick < int(policy.draw_per_quantile)

    mask = np.zeros(rows.num_rows, bool)
    mask[kept] = True  # `kept` is ascending, so the filtered rows line up with it
    out = rows.filter(pa.array(mask))
    return out.append_column("quantile", pa.array((q - 1 - from_bottom).astype(np.int32))).append_column(
        "drawn", pa.array(drawn)).cast(POOL)


def with_samples(pool: pa.Table, samples: pa.Table) -> pa.Table:
    """The pool's rows (in their order) with the columns of their samples (`SAMPLES` rows of every
    round the pool spans), joined by key; the pool's own columns win, its keys as plain strings. Raises LookupError when a
    pooled sample is missing from `samples` or matches more than one."""
    keys = pa.schema([SAMPLES.field(c) for c in KEY])
    left = pool.select(list(KEY)).cast(keys).append_column("_pos", pa.array(np.arange(pool.num_rows)))
    right = samples.select(list(KEY)).cast(keys).append_column("_row", pa.array(np.arange(samples.num_rows)))
    joined = left.join(right, keys=list(KEY), join_type="left outer").sort_by("_pos")
    if joined.num_rows != pool.num_rows:
        raise LookupError(f"{joined.num_rows - pool.num_rows} pooled samples match more than one sample row")
    if joined.column("_row").null_count:
        missing = joined.filter(pc.is_null(joined.column("_row"))).slice(0, 1).select(list(KEY)).to_pylist()[0]
        raise LookupError(f"{joined.column('_row').null_count} pooled samples have no sample row (first: {missing})")
    wide = samples.take(joined.column("_row"))
    out = pool.cast(pa.schema([keys.field(f.name) if f.name in KEY else f for f in pool.schema]))  # plain strings
    for name in samples.column_names:
        if name not in pool.column_names:
            out = out.append_column(name, wide.column(name))
    return out


def pool_samples(pool: pa.Table, artifacts: list) -> pa.Table:
    """`pool`'s rows with their samples' columns, read from the data_pool artifacts (`Upstream`s) of
    every round it spans."""
    samples = pa.concat_tables([pq.read_table(a.local_dir() / SAMPLES_FILE) for a in artifacts])
    try:
        return with_samples(pool, samples)
    except LookupError as e:
        raise BadInput(f"data_pool: {e} in {', '.join(a.path for a in artifacts)}") from None


def summary(pool: pa.Table, round_: int) -> dict:
    """Metrics of a pool for the manifest: its size, this round's share, the draw, per-quantile means."""
    rounds = pool.column("round").to_numpy()
    quantile, reward = pool.column("quantile").to_numpy(), pool.column("reward").to_numpy()
    means = {f"mean_reward_q{int(k)}": float(reward[quantile == k].mean()) for k in np.unique(quantile)}
    return {"pool_samples": pool.num_rows, "new_samples": int((rounds == round_).sum()),
            "drawn": int(pc.sum(pool.column("drawn")).as_py() or 0),
            "prompts": len(pc.unique(pool.column("prompt_id"))),
            "oldest_round": int(rounds.min()) if pool.num_rows else None, **means}
