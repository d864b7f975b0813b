"""Attention of a bf16 training step on CPU: which kernel and dtype to run it in.

precision.py runs a bf16 model's attention on CPU as sdpa on float32 copies of q, k and v
(`sdpa_fp32`), because PyTorch's CPU flash-attention kernel was slower in bf16 than in float32.
This measures that choice again on the machine at hand, forward and backward of one attention layer
at SmolLM2-135M's shape (9 query heads over 3 key-value heads, head dim 64, a boolean causal mask
as transformers passes for a padded batch), side by side:

    fp32 copies   q, k, v cast to float32, sdpa, the output cast back (what bf16 training runs)
    bf16 flash    sdpa in bf16, the flash kernel (sdpa's CPU default)
    bf16 math     sdpa in bf16, the math backend (matmuls and a softmax)
    fp32          a float32 model's attention, for scale

    .venv/bin/python benchmarks/bench_attention.py [--batch 8] [--lengths 96 128] [--reps 30]

Prints milliseconds per layer (median of the repetitions) and writes
benchmarks/results/attention.json. A step of SmolLM2 runs 30 such layers per micro-batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_dpo  # noqa: E402  (machine facts, commit)

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def _inputs(batch: int, length: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, HEADS, length, HEAD_DIM, generator=g).to(dtype).requires_grad_()
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=g).to(dtype).requires_grad_()
    v = torch.randn(batch, KV_HEADS, length, HEAD_DIM, generator=g).to(dtype).requires_grad_()
    return q, k, v


def _attend(q, k, v, compute: torch.dtype, backend: SDPBackend):
    # as transformers' sdpa path calls it on a padded training batch: a boolean mask (causal here),
    # so the key-value heads are repeated rather than passed to sdpa's GQA
    rep = HEADS // KV_HEADS
    kq, vq = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=torch.bool).tril().expand(q.shape[0], 1, n, n)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q.to(compute), kq.to(compute), vq.to(compute), attn_mask=mask)
    return out.to(q.dtype)


VARIANTS = {
    "fp32 copies": (torch.bfloat16, torch.float32, SDPBackend.FLASH_ATTENTION),
    "bf16 flash": (torch.bfloat16, torch.bfloat16, SDPBackend.FLASH_ATTENTION),
    "bf16 math": (torch.bfloat16, torch.bfloat16, SDPBackend.MATH),
    "fp32": (torch.float32, torch.float32, SDPBackend.FLASH_ATTENTION),
}


def time_variant(name: str, batch: int, length: int, reps: int) -> float:
    dtype, compute, backend = VARIANTS[name]
    q, k, v = _inputs(batch, length, dtype)
    grad = torch.randn(batch, HEADS, length, HEAD_DIM).to(dtype)
    times = []
    for i in range(reps + 3):
        t = time.perf_counter()
        _attend(q, k, v, compute, backend).backward(grad)
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t)
        q.grad = k.grad = v.grad = None
    return 1e3 * statistics.median(times)


def agreement(batch: int, length: int) -> dict:
    """Each bf16 variant's output against a float64 reference: the largest absolute difference."""
    q, k, v = (t.detach() for t in _inputs(batch, length, torch.bfloat16))
    exact = _attend(q.double(), k.double(), v.double(), torch.float64, SDPBackend.MATH)
    return {name: float((_attend(q, k, v, compute, backend).double() - exact).abs().max())
            for name, (dtype, compute, backend) in VARIANTS.items() if dtype == torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[96, 128])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attention.json")
    a = ap.parse_args()
    rows = []
    for length in a.lengths:
        for rnd in range(2):  # the variants alternate, twice; the better median of each kept
            for name in (VARIANTS if rnd == 0 else reversed(list(VARIANTS))):
                ms = time_variant(name, a.batch, length, a.reps)
                rows.append({"variant": name, "length": length, "ms": ms, "round": rnd})
    best = {}
    for r in rows:
        key = (r["variant"], r["length"])
        best[key] = min(best.get(key, float("inf")), r["ms"])
    errors = {length: agreement(a.batch, length) for length in a.lengths}
    print(f"CPU: {bench_dpo.machine()['cpu']}, {torch.get_num_threads()} threads; one layer fwd+bwd, "
          f"batch {a.batch}, {HEADS} heads over {KV_HEADS}, head dim {HEAD_DIM}, causal mask (ms, best of 2 medians)")
    print("| variant | " + " | ".join(f"length {n}" for n in a.lengths) + " | max error vs float64 |")
    print("|---|" + "---|" * len(a.lengths) + "---|")
    for name in VARIANTS:
        err = " / ".join(f"{errors[n][name]:.1e}" for n in a.lengths) if name in errors[a.lengths[0]] else "-"
        print(f"| {name} | " + " | ".join(f"{best[(name, n)]:.2f}" for n in a.lengths) + f" | {err} |")
    result = {"benchmark": "attention", "commit": bench_dpo.commit(), "machine": bench_dpo.machine(),
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "batch": a.batch,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": rows,
              "best_ms": {f"{v} @ {n}": ms for (v, n), ms in best.items()}, "max_error": errors}
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {a.out}")


if __name__ == "__main__":
    main()
