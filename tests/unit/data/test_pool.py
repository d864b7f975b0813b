"""stages.data.pool against hand-made tables (drop, age, caps, quantiles global and per prompt,
ties, all rewards equal, fewer samples than quantiles, the draw), and against a plain-Python
restatement of the same policy over random tables (hypothesis)."""

import math

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.data import pool as P


def samples(rows, round_):
    base = {"prompt": "p", "split": "train", "completion": "c", "truncated": False}
    return P.samples_table(pa.Table.from_pylist([{**base, **r} for r in rows]), round_)


def prompt_rows(pid, rewards, start=0, **extra):
    return [{"prompt_id": pid, "sample_index": start + i, "score": float(r), **extra} for i, r in enumerate(rewards)]


def key(rows):
    return sorted((r["prompt_id"], r["round"], r["sample_index"]) for r in rows)


def run_rounds(per_round, policy, seed=0):
    """Pool after each round; per_round[k] is the list of sample rows of round k."""
    pool, out = None, []
    for k, rows in enumerate(per_round):
        pool = P.update(pool, samples(rows, k), k, policy, seed)
        out.append(pool.to_pylist())
    return out


# -- quantiles -------------------------------------------------------------------------------------

def test_five_distinct_rewards_fill_five_quantiles_best_first():
    (pool,) = run_rounds([prompt_rows("a", [0, 1, 2, 3, 4])], P.PoolPolicy(quantiles=5))
    assert {r["reward"]: r["quantile"] for r in pool} == {4.0: 0, 3.0: 1, 2.0: 2, 1.0: 3, 0.0: 4}


def test_ties_share_a_bin_and_equal_rewards_land_in_the_middle():
    (pool,) = run_rounds([prompt_rows("a", [1, 1, 1, 1, 5, 9])], P.PoolPolicy(quantiles=3))
    by_reward = {}
    for r in pool:
        by_reward.setdefault(r["reward"], set()).add(r["quantile"])
    assert all(len(q) == 1 for q in by_reward.values())  # ties never split
    # mid-ranks 2.5, 5, 6 of 6 -> bins from the bottom floor(3 * (m - 0.5) / 6) = 1, 2, 2
    assert by_reward == {1.0: {1}, 5.0: {0}, 9.0: {0}}
    (same,) = run_rounds([prompt_rows("a", [2, 2, 2, 2])], P.PoolPolicy(quantiles=5))
    assert {r["quantile"] for r in same} == {2}  # the middle one of five


def test_fewer_samples_than_quantiles_spread_over_the_range():
    (pool,) = run_rounds([prompt_rows("a", [0, 10])], P.PoolPolicy(quantiles=5))
    # mid-ranks 1, 2 of 2 -> from the bottom floor(5 * 0.5 / 2) = 1 and floor(5 * 1.5 / 2) = 3
    assert {r["reward"]: r["quantile"] for r in pool} == {0.0: 3, 10.0: 1}
    (one,) = run_rounds([prompt_rows("a", [3])], P.PoolPolicy(quantiles=5))
    assert one[0]["quantile"] == 2


def test_global_and_per_prompt_scopes():
    rows = prompt_rows("a", [0, 1]) + prompt_rows("b", [10, 11])
    (glob,) = run_rounds([rows], P.PoolPolicy(quantiles=2, quantile_scope="global"))
    (per,) = run_rounds([rows], P.PoolPolicy(quantiles=2, quantile_scope="per_prompt"))
    assert {r["reward"]: r["quantile"] for r in glob} == {0.0: 1, 1.0: 1, 10.0: 0, 11.0: 0}
    assert {r["reward"]: r["quantile"] for r in per} == {0.0: 1, 1.0: 0, 10.0: 1, 11.0: 0}


def test_splits_are_binned_apart():
    rows = prompt_rows("a", [0, 1]) + [{**r, "split": "heldout"} for r in prompt_rows("h", [50, 60])]
    (pool,) = run_rounds([rows], P.PoolPolicy(quantiles=2))
    assert {r["reward"]: r["quantile"] for r in pool} == {0.0: 1, 1.0: 0, 50.0: 1, 60.0: 0}


def test_quantiles_are_recomputed_over_the_whole_pool_each_round():
    r0, r1 = run_rounds([prompt_rows("a", [0, 1]), prompt_rows("a", [2, 3], start=2)], P.PoolPolicy(quantiles=2))
    assert {r["reward"]: r["quantile"] for r in r0} == {0.0: 1, 1.0: 0}
    assert {r["reward"]: r["quantile"] for r in r1} == {0.0: 1, 1.0: 1, 2.0: 0, 3.0: 0}


# -- what is kept ----------------------------------------------------------------------------------

def test_keep_all_drop_all_and_half():
    per_round = [prompt_rows("a", [0, 1, 2, 3]), prompt_rows("a", [4, 5], start=4)]
    keep_all = run_rounds(per_round, P.PoolPolicy(drop=0.0))[-1]
    assert len(keep_all) == 6
    on_policy = run_rounds(per_round, P.PoolPolicy(drop=1.0))[-1]
    assert {r["round"] for r in on_policy} == {1} and len(on_policy) == 2
    half = run_rounds(per_round, P.PoolPolicy(drop=0.5))[-1]
    assert len(half) == 4 and sum(r["round"] == 0 for r in half) == 2


def test_drop_takes_the_oldest_first():
    per_round = [prompt_rows("a", [0, 1]), prompt_rows("a", [2, 3], start=2), prompt_rows("a", [4, 5], start=4)]
    pools = run_rounds(per_round, P.PoolPolicy(drop=0.5))
    # round 2: the previous pool (2 of round 0 kept at half = 1 of round 0, plus 2 of round 1) loses half, oldest first
    assert sorted(r["round"] for r in pools[1]) == [0, 1, 1]
    assert sorted(r["round"] for r in pools[2]) == [1, 1, 2, 2]


def test_age_limit_and_cap_per_prompt():
    per_round = [prompt_rows("a", [0, 1]) + prompt_rows("b", [0]), prompt_rows("a", [2, 3], start=2),
                 prompt_rows("a", [4], start=4)]
    aged = run_rounds(per_round, P.PoolPolicy(max_age=2))[-1]
    assert {r["round"] for r in aged} == {1, 2}  # round 0 is two rounds old at round 2
    capped = run_rounds(per_round, P.PoolPolicy(max_per_prompt=2))[-1]
    counts = {}
    for r in capped:
        counts.setdefault(r["prompt_id"], []).append(r["round"])
    assert sorted(counts["a"]) == [1, 2] and counts["b"] == [0]  # the newest, per prompt


def test_earlier_pools_are_left_as_they_were():
    first = P.update(None, samples(prompt_rows("a", [0, 1]), 0), 0, P.PoolPolicy(drop=1.0), 0)
    snapshot = first.to_pylist()
    P.update(first, samples(prompt_rows("a", [2], start=2), 1), 1, P.PoolPolicy(drop=1.0), 0)
    assert first.to_pylist() == snapshot


def test_unscored_samples_stay_out():
    table = samples(prompt_rows("a", [1, 2]) + [{"prompt_id": "a", "sample_index": 9, "score": None}], 0)
    assert table.num_rows == 2


# -- the draw --------------------------------------------------------------------------------------

def test_draw_prefers_untruncated_and_is_seeded():
    rows = [{"prompt_id": "a", "sample_index": i, "score": 1.0, "truncated": i < 3} for i in range(6)]
    policy = P.PoolPolicy(quantiles=2, draw_per_quantile=2)
    (pool,) = run_rounds([rows], policy)
    drawn = [r for r in pool if r["drawn"]]
    assert len(drawn) == 2 and not any(r["truncated"] for r in drawn)  # all six tie: one bin
    again = run_rounds([rows], policy)[0]
    assert [r["drawn"] for r in again] == [r["drawn"] for r in pool]
    other_seeds = {tuple(r["drawn"] for r in run_rounds([rows], policy, seed=s)[0]) for s in range(8)}
    assert len(other_seeds) > 1  # the seed picks among the untruncated


def test_everything_drawn_without_a_draw_limit():
    (pool,) = run_rounds([prompt_rows("a", [0, 1, 2])], P.PoolPolicy())
    assert all(r["drawn"] for r in pool)


def test_summary_metrics():
    pools = run_rounds([prompt_rows("a", [0, 1]), prompt_rows("b", [5, 6], start=0)], P.PoolPolicy(quantiles=2))
    table = pa.Table.from_pylist(pools[-1], schema=P.POOL)
    m = P.summary(table, 1)
    assert (m["pool_samples"], m["new_samples"], m["drawn"], m["prompts"], m["oldest_round"]) == (4, 2, 4, 2, 0)
    assert m["mean_reward_q0"] == pytest.approx(5.5) and m["mean_reward_q1"] == pytest.approx(0.5)


# -- the same policy restated in plain Python, over random tables ----------------------------------

def reference_policy(per_round, policy):
    """Kept rows and their quantiles by the module docstring's rules, written the simple way."""
    pool = []
    for k, rows in enumerate(per_round):
        kept = []
        by_prompt = {}
        for r in pool:
            if policy.max_age and k - r["round"] >= policy.max_age:
                continue
            by_prompt.setdefault(r["prompt_id"], []).append(r)
        for group in by_prompt.values():
            group.sort(key=lambda r: r["round"])
            n_drop = math.floor(len(group) * policy.drop + 1e-9)
            # within a round the order is seeded: only the count per round is checked here
            kept.extend(group[n_drop:])
        fresh = [{**r, "round": k, "reward": r["score"]} for r in rows]
        pool = kept + fresh
    n = len(pool)
    rewards = sorted(r["reward"] for r in pool)
    out = []
    for r in pool:
        below = sum(x < r["reward"] for x in rewards)
        ties = sum(x == r["reward"] for x in rewards)
        mid = below + 1 + (ties - 1) / 2
        from_bottom = min(policy.quantiles - 1, math.floor(policy.quantiles * (mid - 0.5) / n))
        out.append((r["prompt_id"], r["round"], r["reward"], policy.quantiles - 1 - from_bottom))
    return sorted(out)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 4)), min_size=1, max_size=12),
                min_size=1, max_size=4),
       st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([None, 1, 2]), st.integers(2, 5))
def test_matches_a_plain_python_statement_of_the_policy(draws, drop, max_age, quantiles):
    per_round = []
    for rows in draws:
        count = {}
        out = []
        for pid, reward in rows:
            count[pid] = count.get(pid, 0) + 1
            out.append({"prompt_id": pid, "sample_index": count[pid], "score": float(reward)})
        per_round.append(out)
    policy = P.PoolPolicy(quantiles=quantiles, drop=drop, max_age=max_age)
    got = run_rounds(per_round, policy)[-1]
    expected = reference_policy(per_round, policy)
    # The rows dropped within one round are chosen by the seeded order; compare per (prompt, round)
    # counts, and the quantile of every reward (which depends only on the kept multiset).
    count = lambda rows: sorted((r[0], r[1]) for r in rows)  # noqa: E731
    assert count([(r["prompt_id"], r["round"]) for r in got]) == count(expected)
    if all(r[1] == len(per_round) - 1 or drop == 0.0 for r in expected):
        assert sorted((r["prompt_id"], r["round"], r["reward"], r["quantile"]) for r in got) == expected


def test_the_cap_applies_to_this_rounds_samples_too():
    (pool,) = run_rounds([prompt_rows("a", [0, 1, 2, 3, 4])], P.PoolPolicy(max_per_prompt=3))
    assert len(pool) == 3
    r0, r1 = run_rounds([prompt_rows("a", [0, 1]), prompt_rows("a", [2, 3, 4, 5], start=2)],
                        P.PoolPolicy(max_per_prompt=3))
    assert [r["round"] for r in r1] == [1, 1, 1]


# -- the narrow pool and its samples ---------------------------------------------------------------

def test_the_pool_is_narrow_and_joins_back_to_every_rounds_samples_in_its_order():
    s0 = samples([{**r, "completion": f"r0-{r['sample_index']}"} for r in prompt_rows("a", [0, 1, 2])], 0)
    s1 = samples([{**r, "completion": f"r1-{r['sample_index']}"} for r in prompt_rows("a", [3, 4], start=0)], 1)
    pool = P.update(P.update(None, s0, 0, P.PoolPolicy(drop=0.5), 0), s1, 1, P.PoolPolicy(drop=0.5), 0)
    assert pool.schema == P.POOL and "completion" not in pool.column_names
    # samples given in another order (and with rows the pool dropped) join back in the pool's order
    wide = P.with_samples(pool, pa.concat_tables([s1, s0]).take([4, 0, 2, 1, 3])).to_pylist()
    assert [(r["round"], r["completion"]) for r in wide] == \
        [(r["round"], f"r{r['round']}-{r['sample_index']}") for r in pool.to_pylist()]
    assert [r["quantile"] for r in wide] == pool.column("quantile").to_pylist()  # the pool's own columns
    assert pool.schema.field("prompt_id").type != pa.string()  # dictionary-encoded in the pool,
    assert P.with_samples(pool, pa.concat_tables([s0, s1])).schema.field("prompt_id").type == pa.string()  # not here
    with pytest.raises(LookupError, match="2 pooled samples have no sample row"):
        P.with_samples(pool, s0)
    with pytest.raises(LookupError, match="match more than one"):
        P.with_samples(pool, pa.concat_tables([s0, s1, s1]))


def test_duplicate_keys_are_found():
    rows = prompt_rows("a", [0, 1]) + prompt_rows("b", [0])
    assert P.duplicate_key(samples(rows, 0)) is None
    assert P.duplicate_key(samples(rows + prompt_rows("b", [5]), 0)) == ("train", "b", 0, 0)


def test_the_stage_refuses_samples_it_could_not_join_back(tmp_path):
    from types import SimpleNamespace

    from stages import data_pool
    from stages.config import DataPoolConfig
    from stages.pipeline.errors import BadInput

    table = pa.Table.from_pylist([{"prompt_id": "a", "prompt": "p", "split": "train", "sample_index": 0,
                                   "completion": c, "score": 1.0} for c in ("x", "y")])
    ctx = SimpleNamespace(inputs={"annotate": SimpleNamespace(stage="annotate", table=lambda: table)}, round=0,
                          seed=0, workdir=tmp_path, log=None)
    with pytest.raises(BadInput, match=r"annotate has two samples with split, prompt_id, round, sample_index = \('train', 'a', 0, 0\)"):
        data_pool.run(ctx, DataPoolConfig(quantiles=2, quantile_scope="global"))
    assert not list(tmp_path.iterdir())  # nothing written


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 3), st.booleans()), min_size=1, max_size=40),
       st.integers(1, 3), st.integers(2, 4), st.sampled_from(["global", "per_prompt"]), st.integers(0, 5))
def test_the_draw_takes_the_untruncated_first_up_to_its_count_per_prompt_and_quantile(rows, per, q, scope, seed):
    table = [{"prompt_id": pid, "sample_index": i, "score": float(r), "truncated": t} for i, (pid, r, t) in enumerate(rows)]
    (pool,) = run_rounds([table], P.PoolPolicy(quantiles=q, quantile_scope=scope, draw_per_quantile=per), seed)
    cells = {}
    for r in pool:
        cells.setdefault((r["prompt_id"], r["quantile"]), []).append(r)
    for cell in cells.values():
        drawn = [r for r in cell if r["drawn"]]
        assert len(drawn) == min(per, len(cell))
        if any(r["truncated"] for r in drawn):  # a truncated one only when too few are untruncated
            assert all(r["drawn"] for r in cell if not r["truncated"])
