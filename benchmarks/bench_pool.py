"""Building round k's data pool (drop policy, quantiles over the pool, the training draw) from 10k,
100k and 1M pooled samples: ours (stages/data/pool.py: NumPy sorts over a narrow table of sample
keys; the samples' texts and token ids are stored once, in the round that drew them) beside a
dict-and-list pool written the way the NLF project's data_pool.py keeps its pool (Python lists of
samples, sorted in Python, quantile index by position), extended here to the same policy so that
both compute the same pool.

Each configuration runs in its own process (fresh memory), the two alternate, and the table
reports the median wall time of `repeats` runs and the peak RSS. Both get their input in memory
in their own form (ours: the previous round's pool table and this round's sample table; theirs: a
list of sample dicts) and return their output in that form; making the input is not timed. A check
at the smallest size asserts both keep the same samples per (prompt, round) and give every reward
the same quantile.

    .venv/bin/python benchmarks/bench_pool.py [--sizes 10000 100000 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUNDS = 4  # the previous pool spans rounds 0..3; round 4 is being built
PER_PROMPT = 8  # previous samples per prompt
POLICY = {"quantiles": 5, "quantile_scope": "global", "drop": 0.25, "max_age": 4, "max_per_prompt": 12,
          "draw_per_quantile": 2}


def synthetic(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A previous pool of n samples over ROUNDS rounds and n/ROUNDS new ones, as sample dicts."""
    rng = random.Random(seed)
    prompts = max(1, n // PER_PROMPT)
    words = ["good", "bad", "film", "plot", "actor", "scene", "great", "dull", "story", "end"]

    def sample(pid: int, round_: int, index: int) -> dict:
        text = " ".join(rng.choice(words) for _ in range(16))
        return {"prompt_id": f"p{pid}", "prompt": f"The movie {pid} was", "split": "train", "sample_index": index,
                "completion": text, "truncated": rng.random() < 0.2, "checkpoint": f"round-{round_ - 1}/train/model",
                "reward": round(rng.random(), 3), "feedback": None, "weight": 1.0, "conditioning": "<|quark_0|>",
                "prompt_ids": [1, 2, 3, pid % 1000], "completion_ids": [rng.randrange(49152) for _ in range(32)],
                "round": round_}

    old = [sample(i % prompts, (i // prompts) % ROUNDS, i // (prompts * ROUNDS)) for i in range(n)]
    new = [sample(i % prompts, ROUNDS, i // prompts) for i in range(max(1, n // ROUNDS))]
    return old, new


# --------------------------------------------------------------------------- the dict-and-list pool

class DictPool:
    """Samples as a list of dicts; every step a Python pass over them (the NLF project's way)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def update(self, new: list[dict], round_: int, p: dict, seed: int) -> list[dict]:
        def order(s):  # a seeded tie-break, like ours
            return hash((seed, s["prompt_id"], s["round"], s["sample_index"]))

        by_prompt: dict[str, list[dict]] = {}
        for s in self.samples:
            if p["max_age"] and round_ - s["round"] >= p["max_age"]:
                continue
            by_prompt.setdefault(s["prompt_id"], []).append(s)
        kept = []
        for group in by_prompt.values():
            group.sort(key=lambda s: (s["round"], order(s)))
            kept.extend(group[math.floor(len(group) * p["drop"] + 1e-9):])
        pool: dict[str, list[dict]] = {}
        for s in kept + new:
            pool.setdefault(s["prompt_id"], []).append(s)
        capped = []
        for group in pool.values():
            group.sort(key=lambda s: (-s["round"], order(s)))
            capped.extend(group[: p["max_per_prompt"]] if p["max_per_prompt"] else group)
        # quantiles over the pool by mid-rank (0 = best), then the draw per prompt and quantile
        ranked = sorted(capped, key=lambda s: s["reward"])
        n, q, i = len(ranked), p["quantiles"], 0
        out = []
        while i < n:
            j = i
            while j < n and ranked[j]["reward"] == ranked[i]["reward"]:
                j += 1
            mid = (i + 1 + j) / 2
            bin_ = q - 1 - min(q - 1, math.floor(q * (mid - 0.5) / n))
            out.extend({**s, "quantile": bin_} for s in ranked[i:j])
            i = j
        cells: dict[tuple, list[dict]] = {}
        for s in out:
            cells.setdefault((s["prompt_id"], s["quantile"]), []).append(s)
        for cell in cells.values():
            cell.sort(key=lambda s: (s["truncated"], order(s)))
            for k, s in enumerate(cell):
                s["drawn"] = not p["draw_per_quantile"] or k < p["draw_per_quantile"]
        self.samples = out
        return out


# --------------------------------------------------------------------------- the runs

def child(kind: str, n: int) -> dict:
    old, new = synthetic(n)
    if kind == "ours":
        import pyarrow as pa

        from stages.data.pool import ENTRY, SAMPLES, PoolPolicy, update

        # the previous round's pool is narrow (keys, rewards); this round's samples are whole
        old_t = pa.Table.from_pylist(old, schema=SAMPLES).select(ENTRY.names).cast(ENTRY)
        new_t = pa.Table.from_pylist(new, schema=SAMPLES)
        del old, new
        t0 = time.perf_counter()
        out = update(old_t, new_t, ROUNDS, PoolPolicy(**POLICY), seed=0)
        wall = time.perf_counter() - t0
        rows, drawn = out.num_rows, sum(out.column("drawn").to_pylist())
    else:
        pool = DictPool(old)
        t0 = time.perf_counter()
        out = pool.update(new, ROUNDS, POLICY, seed=0)
        wall = time.perf_counter() - t0
        rows, drawn = len(out), sum(s["drawn"] for s in out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "n": n, "seconds": wall, "rows": rows, "drawn": drawn, "peak_rss_mb": peak}


def check(n: int) -> None:
    """Both implementations keep the same samples per (prompt, round) and bin every reward alike."""
    import pyarrow as pa

    from stages.data.pool import SAMPLES, PoolPolicy, update

    old, new = synthetic(n)
    ours = update(pa.Table.from_pylist(old, schema=SAMPLES), pa.Table.from_pylist(new, schema=SAMPLES), ROUNDS,
                  PoolPolicy(**{**POLICY, "max_per_prompt": None}), 0).to_pylist()
    theirs = DictPool([dict(s) for s in old]).update([dict(s) for s in new], ROUNDS,
                                                    {**POLICY, "max_per_prompt": None}, 0)
    count = lambda rows: sorted((r["prompt_id"], r["round"]) for r in rows)  # noqa: E731
    assert count(ours) == count(theirs), "the two pools keep different samples"
    # which samples of a (prompt, round) the drop keeps is the seeded order's choice, so compare
    # the binning rule on one pool: ours' kept rewards binned by the dict pool give ours' quantiles
    rebinned = DictPool([]).update([{**r, "drawn_in": r["round"], "round": ROUNDS} for r in ours], ROUNDS,
                                   {**POLICY, "drop": 0.0, "max_age": None, "max_per_prompt": None}, 0)
    key = lambda r: (r["prompt_id"], r.get("drawn_in", r["round"]), r["sample_index"])  # noqa: E731
    assert {key(r): r["quantile"] for r in rebinned} == {key(r): r["quantile"] for r in ours}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pool.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    check(min(args.sizes))
    print(f"check passed at {min(args.sizes)} samples; load before: {load()}", flush=True)
    runs = []
    for n in args.sizes:
        for r in range(args.repeats):
            for kind in (("ours", "dict") if r % 2 == 0 else ("dict", "ours")):
                out = subprocess.run([sys.executable, __file__, "--child", kind, str(n)], capture_output=True,
                                     text=True, check=True, cwd=ROOT)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append(res)
                print(f"{kind:5s} n={n:>8,d} {res['seconds']:8.3f}s  rss {res['peak_rss_mb']:7.0f} MB", flush=True)
    table = []
    for n in args.sizes:
        med = {k: statistics.median(r["seconds"] for r in runs if r["kind"] == k and r["n"] == n) for k in ("ours", "dict")}
        rss = {k: max(r["peak_rss_mb"] for r in runs if r["kind"] == k and r["n"] == n) for k in ("ours", "dict")}
        table.append({"samples": n, "ours_s": med["ours"], "dict_s": med["dict"], "speedup": med["dict"] / med["ours"],
                      "ours_rss_mb": rss["ours"], "dict_rss_mb": rss["dict"]})
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "load_after": load(),
              "policy": POLICY, "repeats": args.repeats, "table": table, "runs": runs}
    args.out.write_text(json.dumps(result, indent=2))
    print("\n| pooled samples | ours (s) | dict pool (s) | speed-up | ours peak RSS | dict peak RSS |\n|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['samples']:,} | {t['ours_s']:.2f} | {t['dict_s']:.2f} | {t['speedup']:.1f}x | "
              f"{t['ours_rss_mb']:.0f} MB | {t['dict_rss_mb']:.0f} MB |")
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
