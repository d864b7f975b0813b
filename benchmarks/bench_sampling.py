"""Sampling and annotator throughput on SmolLM2 / MiniLM, side by side in one run.

Each configuration runs in its own process (fresh memory, no warm caches from the others), the
configurations alternate, and the table reports medians over repeats:
  - sampling tokens/s with `generate` at batch 1 and at the configured batch (KV cache, left padding);
  - annotator texts/s: the MiniLM reward model, the vaderSentiment rule, the SmolLM2 judge (pairs/s).

    .venv/bin/python benchmarks/bench_sampling.py [--repeats 3] [--batch 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prompts(n: int) -> list[str]:
    from stages.data.sources import read_corpus

    texts = read_corpus("movie_snippets").column("text").to_pylist()
    return [" ".join(t.split()[:6]) for t in texts[:n]]


def child(kind: str, batch: int, n_prompts: int, new_tokens: int) -> dict:
    import logging

    import torch

    torch.manual_seed(0)
    if kind == "sample":
        from stages.config import SampleConfig
        from stages.services.models import resolve_model
        from stages.services.generation import generate_hf

        cfg = SampleConfig(n=1, batch_size=batch, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0)
        t0 = time.perf_counter()
        out = generate_hf(resolve_model("smollm2"), prompts(n_prompts), cfg, 0, logging.getLogger("bench"))
        wall = time.perf_counter() - t0
        tokens = sum(g[0]["completion_tokens"] for g in out)
        return {"kind": f"sample batch {batch}", "tokens_per_s": tokens / wall, "tokens": tokens, "seconds": wall}
    from stages.annotators import ANNOTATORS, vader_compound
    from stages.config import annotator_step

    ps = prompts(n_prompts)
    completions = [f"was {w} from start to finish, and I would watch it again." for w in
                   ("wonderful", "dull", "moving", "awful") * (n_prompts // 4 + 1)][:n_prompts]
    if kind == "vader":
        t0 = time.perf_counter()
        vader_compound(ps, completions)
    else:
        # The reward model's speed is its architecture's: MiniLM with a fresh one-output head
        # stands in for the trained one, so the benchmark needs no reward_movies run first.
        model = {"llm_judge": "smollm2", "reward_model": "minilm"}.get(kind)
        step = annotator_step(kind=kind, **({"model": model, "batch_size": 32} if model else {}))
        annotator = ANNOTATORS[kind](step)
        if kind == "llm_judge":  # two samples per prompt: n_prompts / 2 pairs, each judged in both orders
            ps = [p for p in ps[: n_prompts // 2] for _ in (0, 1)]
        t0 = time.perf_counter()
        annotator(ps, completions)
    wall = time.perf_counter() - t0
    return {"kind": kind, "texts_per_s": n_prompts / wall, "seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=4)
    a = ap.parse_args()
    if a.child:
        kind, batch, n, tokens = a.child
        print(json.dumps(child(kind, int(batch), int(n), int(tokens))))
        return
    repeats = 1 if a.quick else a.repeats
    configs = [("sample", 1, 4 if a.quick else 8), ("sample", a.batch, a.batch), ("reward_model", 0, 256),
               ("vader", 0, 256), ("llm_judge", 0, 32)]
    results: dict[str, list[dict]] = {}
    for r in range(repeats):
        for kind, batch, n in configs:
            proc = subprocess.run([sys.executable, __file__, "--child", kind, str(batch), str(n), str(a.new_tokens)],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"{kind} failed: {proc.stderr.strip().splitlines()[-1]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.setdefault(row["kind"], []).append(row)
            print(f"repeat {r + 1}: {row}", file=sys.stderr)
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    s1, sb = med(results["sample batch 1"], "tokens_per_s"), med(results[f"sample batch {a.batch}"], "tokens_per_s")
    lines = ["| measurement | median | unit |", "|---|---|---|",
             f"| sampling, batch 1 | {s1:.1f} | tokens/s |",
             f"| sampling, batch {a.batch} | {sb:.1f} | tokens/s |",
             f"| speed-up, batch {a.batch} / batch 1 | {sb / s1:.1f}x | (target >= 8x) |"]
    for kind, unit in (("reward_model", "texts/s"), ("vader", "texts/s"), ("llm_judge", "texts/s (pairs x 2 orders)")):
        lines.append(f"| annotator {kind} | {med(results[kind], 'texts_per_s'):.1f} | {unit} |")
    table = "\n".join(lines)
    out = ROOT / "benchmarks" / "results" / "sampling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"repeats": repeats, "batch": a.batch, "results": results, "table": table}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
