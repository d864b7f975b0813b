"""One bf16 optimizer step over SmolLM2-135M's weights, three ways: measured, and not adopted.

bf16 training (stages/training/precision.py) keeps float32 masters and AdamW moments beside the
model's bf16 weights; the gradients arrive in bf16 on the model, and torch's fused AdamW takes one
dtype. The trainer's step is four passes over the weights; the question was whether one pass
would be faster, or leaner. Side by side, on the same tensors (SmolLM2-135M's shapes, random
values, clipping on as in every flow), each variant in its own process (its own peak RSS):

    four passes   the trainer's: bf16 gradients cast to a float32 set, torch.nn.utils.
                  clip_grad_norm_ on it, torch's fused AdamW on the masters, the masters rounded
                  into the bf16 weights (each pass timed too)
    one pass      MasterAdamW below: per chunk of weights, cast and scale the gradient, torch's
                  fused AdamW kernel, round into the weight; at several chunk sizes
    inductor      the same update written for torch.compile (dynamic shapes), one kernel a
                  parameter (--compiled; its first step compiles it)

    .venv/bin/python benchmarks/bench_optimizer.py [--steps 8] [--chunks 16 18 20] [--compiled]

Prints the median milliseconds per step and the peak RSS of each, and writes
benchmarks/results/optimizer.json. Before timing, the one-pass step is checked bit-exact against
the four passes on small tensors. The answer on the Xeon with AMX (docs/benchmarks.md): neither
faster nor leaner where it counts (an online round's peak is elsewhere), so the trainer keeps the
four passes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_dpo  # noqa: E402  (machine facts, commit)

from stages.training import precision  # noqa: E402


# Elements per chunk (--chunks measures others).
CHUNK = 1 << 18


class MasterAdamW(torch.optim.Optimizer):
    """AdamW over `masters.params` (float32) reading the model's bf16 gradients a chunk at a time and
    writing the model's bf16 weights in the same pass: torch's fused AdamW kernel on each chunk's
    float32 copy, bit-exact to the four passes (checked before timing, `check`). No float32 set of
    gradients exists. `clip_grad_norm_` scales the step's gradients as torch's would, in the pass."""

    def __init__(self, masters, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, chunk: int = CHUNK):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._compute = {id(m): p for m, p in zip(masters.params, masters.compute)}
        self._scale = 1.0
        self.chunk = chunk

    def _grad(self, master: torch.Tensor) -> torch.Tensor | None:
        return master.grad if master.grad is not None else self._compute[id(master)].grad

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The total L2 norm of the step's gradients (in float32, as of a float32 copy of them); the
        step then scales them by min(1, max_norm / (norm + 1e-6)), torch's rule."""
        grads = [g for group in self.param_groups for m in group["params"] if (g := self._grad(m)) is not None]
        if not grads:
            return torch.tensor(0.0)
        # _foreach_norm with dtype float32 reads bf16 and sums in float32: the norms of float32 copies
        # without making them (linalg.vector_norm(g, dtype=float32) is ~10x slower on a CPU)
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        self._scale = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterAdamW.step takes no closure")
        scale, self._scale = self._scale, 1.0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for master in group["params"]:
                weight = self._compute[id(master)]
                grad = self._grad(master)
                state = self.state[master]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                state["step"] += 1
                p, m, v, w = (t.view(-1) for t in (master, state["exp_avg"], state["exp_avg_sq"], weight.data))
                g = grad.view(-1) if grad is not None else None
                for s in range(0, p.numel(), self.chunk):
                    e = min(s + self.chunk, p.numel())
                    if g is None:  # no gradient this step: a zero one, as a float32 model's zeroed .grad
                        g32 = torch.zeros(e - s)
                    elif g.dtype == torch.float32:
                        g32 = g[s:e].mul_(scale) if scale != 1.0 else g[s:e]
                    else:
                        g32 = g[s:e].float()
                        if scale != 1.0:
                            g32.mul_(scale)
                    torch._fused_adamw_([p[s:e]], [g32], [m[s:e]], [v[s:e]], [], [state["step"]], amsgrad=False,
                                        lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                        eps=group["eps"], maximize=False)
                    w[s:e].copy_(p[s:e])  # rounds to bf16 while the chunk is in cache
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for weight in self._compute.values():
            if set_to_none:
                weight.grad = None
            elif weight.grad is not None:
                weight.grad.zero_()


def smollm2_shapes() -> list[tuple[int, ...]]:
    """SmolLM2-135M's trainable tensors (tied embedding once): 30 layers of 4 attention and 3 MLP
    matrices and 2 norms, the embedding, the final norm: 134,515,008 weights."""
    hidden, inter, layers, vocab, kv = 576, 1536, 30, 49152, 192
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
             (inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * layers + [(hidden,)]


def _setup(shapes):
    model = nn.Module()
    g = torch.Generator().manual_seed(0)
    model.params = nn.ParameterList([nn.Parameter(torch.randn(*s, generator=g) * 0.02) for s in shapes])
    masters = precision.MasterWeights(model, list(model.parameters()), fold_in_backward=False)
    grads = [torch.randn(*s, generator=g).mul_(1e-3).bfloat16() for s in shapes]
    return model, masters, grads


def _time(step, steps: int) -> list[float]:
    out = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        if i:  # the first step allocates the moments
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def four_passes(shapes, steps: int, phases: dict) -> list[float]:
    """The step's time; `phases` gets each pass's own times."""
    model, masters, grads = _setup(shapes)
    opt = torch.optim.AdamW(masters.params, lr=1e-5, weight_decay=0.0, fused=True)

    def cast():
        for m, g in zip(masters.params, grads):
            m.grad = g.float()

    def step():
        _timed(phases, "cast gradients to float32", cast)
        _timed(phases, "clip (norm, scale)", lambda: torch.nn.utils.clip_grad_norm_(masters.params, 1.0))
        _timed(phases, "fused AdamW", opt.step)
        _timed(phases, "round into bf16 weights", masters.to_model)
        opt.zero_grad(set_to_none=True)
    return _time(step, steps)


def _update(p, m, v, g, w, lr, step, scale, beta1: float, beta2: float, eps: float, weight_decay: float):
    """AdamW's update of one parameter's flat master `p` and moments from its bf16 gradient `g`,
    rounded into its flat bf16 weight `w`: the one-pass step written for inductor to fuse."""
    g32 = g.float() * scale
    m.lerp_(g32, 1 - beta1)
    v.mul_(beta2).add_(g32 * g32 * (1 - beta2))
    p.mul_(1 - lr * weight_decay)
    denom = v.sqrt() / (1 - beta2 ** step).sqrt() + eps
    p.sub_(m / denom * (lr / (1 - beta1 ** step)))
    w.copy_(p)


class CompiledAdamW(MasterAdamW):
    """MasterAdamW's step as one inductor kernel per parameter (any length: dynamic shapes)."""

    kernel = None

    @torch.no_grad()
    def step(self, closure=None):
        fn = CompiledAdamW.kernel = CompiledAdamW.kernel or torch.compile(_update, dynamic=True, fullgraph=True)
        scale, self._scale = torch.tensor(self._scale), 1.0
        for group in self.param_groups:
            for master in group["params"]:
                state = self.state[master]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(master),
                                 exp_avg_sq=torch.zeros_like(master))
                state["step"] += 1
                fn(master.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                   self._grad(master).view(-1), self._compute[id(master)].data.view(-1),
                   torch.tensor(float(group["lr"])), state["step"], scale, *group["betas"], group["eps"],
                   group["weight_decay"])


def one_pass(shapes, steps: int, chunk: int, phases: dict, kernel: str = "chunks") -> list[float]:
    model, masters, grads = _setup(shapes)
    cls = CompiledAdamW if kernel == "compiled" else MasterAdamW
    opt = cls(masters, masters.params, lr=1e-5, weight_decay=0.0, **({"chunk": chunk} if chunk else {}))

    def step():
        for p, g in zip(masters.compute, grads):
            p.grad = g  # as autograd leaves them
        _timed(phases, "clip (norm of the bf16 gradients)", lambda: opt.clip_grad_norm_(1.0))
        _timed(phases, "the pass", opt.step)
        opt.zero_grad(set_to_none=True)
    return _time(step, steps)


def _timed(phases: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    fn()
    phases.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)


def child(variant: str, steps: int) -> dict:
    """One variant in this process: its step times and peak RSS (the tensors' 1.9 GB plus the
    step's transient memory: the float32 gradient set, or a chunk)."""
    shapes = smollm2_shapes()
    phases: dict[str, list[float]] = {}
    before = rss_gb()
    if variant == "four":
        ms = four_passes(shapes, steps, phases)
    elif variant == "compiled":
        ms = one_pass(shapes, steps, 0, phases, kernel="compiled")
    else:
        ms = one_pass(shapes, steps, 1 << int(variant), phases)
    first = {k: v[0] for k, v in phases.items()}  # with the moments' allocation (and a compile)
    phases = {k: v[1:] for k, v in phases.items()}  # as _time: without the first step
    return {"ms": ms, "phases": phases, "first_step_ms": first, "peak_rss_gb": peak_rss_gb(), "rss_before_gb": before}


def rss_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def check() -> None:
    """MasterAdamW's step equals the four passes bit for bit (clipping active, chunks ragged)."""
    shapes = [(41, 13), (7,), (300,)]
    _, ours, grads = _setup(shapes)
    _, ref, _ = _setup(shapes)
    opt = MasterAdamW(ours, ours.params, lr=1e-2, weight_decay=0.1, chunk=64)
    ref_opt = torch.optim.AdamW(ref.params, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(3):
        for p, g in zip(ours.compute, grads):
            p.grad = g
        for m, g in zip(ref.params, grads):
            m.grad = g.float()
        assert torch.equal(opt.clip_grad_norm_(1e-3), torch.nn.utils.clip_grad_norm_(ref.params, 1e-3))
        opt.step()
        ref_opt.step()
        ref.to_model()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours.params, ref.params))
    assert all(torch.equal(a, b) for a, b in zip(ours.compute, ref.compute))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--chunks", type=int, nargs="+", default=[16, 18, 20], help="log2 of chunk sizes")
    ap.add_argument("--compiled", action="store_true", help="also the torch.compile'd kernel")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "optimizer.json")
    a = ap.parse_args()
    check()
    n = sum(torch.Size(s).numel() for s in smollm2_shapes())
    names = {"four": "four passes", **{str(c): f"one pass, chunk 2^{c}" for c in a.chunks}}
    if a.compiled:
        names["compiled"] = "one pass, inductor kernel"

    runs = {}
    for variant, name in names.items():  # each in its own process: its own peak RSS
        out = subprocess.run([sys.executable, __file__, "--child", variant, str(a.steps)], check=True,
                             capture_output=True, text=True).stdout
        runs[name] = json.loads(out.strip().splitlines()[-1])
    base = statistics.median(runs["four passes"]["ms"])
    print(f"one optimizer step over {n:,} weights (SmolLM2-135M), {torch.get_num_threads()} threads, "
          f"median of {a.steps}; peak RSS (the process holds 1.9 GB of masters, moments, weights, gradients):")
    rows = {}
    for name, r in runs.items():
        med = statistics.median(r["ms"])
        rows[name] = {"median_ms": med, "ratio": med / base, **r}
        print(f"  {name:22s} {med:8.1f} ms  {med / base:5.2f}x   peak RSS {r['peak_rss_gb']:.2f} GB")
    for name, r in runs.items():
        print(f"  {name}, by part: " + ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in r["phases"].items())
              + f"; first step {sum(r['first_step_ms'].values()) / 1e3:.1f} s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": bench_dpo.machine(), "commit": bench_dpo.commit(), "weights": n,
                                 "threads": torch.get_num_threads(), "steps": a.steps,
                                 "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "results": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
