"""Training throughput against the machine's own limit: SFT, DPO, GRPO and Quark on SmolLM2-135M,
float32 and bf16, as model FLOPs utilisation (MFU) of the measured matmul peak; TRL's DPOTrainer
beside ours at each precision.

    .venv/bin/pip install -e '.[bench]'          # TRL 1.16, for the DPO side by side
    .venv/bin/python benchmarks/bench_train.py [--quick] [--steps N] [--repeats R] [--no-trl]
    .venv/bin/python benchmarks/bench_train.py --profile dpo [--precision bf16]   # where the time goes, as MFU's factors
    .venv/bin/python benchmarks/bench_train.py --casts grpo [--precision bf16]    # every dtype cast of a step, by source

1. The peak: the best median rate of large matmuls (2048x576x1536, SmolLM2's MLP shape, and
   2048x2048x2048), each dtype, on every core torch uses; measured before and after the runs, the
   better kept (on a shared VM the same GEMM has ranged from 527 to 1717 GFLOP/s in bf16 here).
2. Our trainer (`stages.training.trainer.fit`, the train stage's loop, every default on) on SmolLM2
   with train.mixed_precision no and bf16, each run in a fresh process, alternating:
     sft    prompt + chosen continuation of the DPO benchmark's 64 pairs, 8 per micro-batch
     dpo    those pairs, 4 per micro-batch (8 sequences), reference log-probs cached
     grpo   4 samples per prompt with rewards, 2 prompts per micro-batch (8 sequences), k3 KL
            (beta 0.04) to the cached per-token reference log-probs
     quark  the pairs' continuations under 2 control tokens, 8 per micro-batch, exact full-vocabulary
            KL (kl_coef 0.05) and entropy, the reference model resident (Quark's default)
   One optimizer step per micro-batch, AdamW lr 5e-6, max length 128 (prompt 64).
3. TRL's DPOTrainer (bench_dpo.py's trl_precompute child: the same pairs, batches and order) with
   bf16=False / bf16=True against our dpo row.

Tokens: the non-padding tokens of every prompt+completion sequence a step trains on (what TRL's
batches hold). Model FLOPs: 6 x N x tokens, N = 134.5M parameters (embeddings included, as the
LM head is a matmul over them); a resident reference's forward pass and recomputation are not
counted. Rate: each step's tokens over its time (the trainer's per-step window), median over the
steps after the first. MFU: that rate's FLOPs over the bf16 peak (the machine's limit; on AMX the
big square GEMM runs about twice the model-shaped one), also over the model-shaped GEMM's rate and
over its own dtype's peak. Peak memory: the child's VmHWM during training. Results:
benchmarks/results/train.json (train_quick.json with --quick; `--report FILE` prints one again).
The last line reads `MFU fp32 X% bf16 Y% speedup Zx`: medians over the four objectives, both
against the bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_dpo  # noqa: E402  (its pairs, measurement helpers, machine facts and TRL child)

RESULTS = ROOT / "benchmarks" / "results"
OBJECTIVES = ("sft", "dpo", "grpo", "quark")
PRECISIONS = ("no", "bf16")
STEPS, QUICK_STEPS = 12, 5
N_PARAMS = 134_515_008  # SmolLM2-135M, tied embeddings counted once
LR = 5e-6
CONTROLS = ("<|quark_0|>", "<|quark_1|>")


def matmul_peak(dtype_name: str, reps: int = 20) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    rates = {}
    for n, k, m in ((2048, 576, 1536), (2048, 2048, 2048)):
        a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        rates[f"{n}x{k}x{m}"] = 2 * n * k * m / statistics.median(times) / 1e9
    return {"gflops": max(rates.values()), "shapes": rates}


def records(objective: str, pairs: list[dict]) -> tuple[list[dict], dict]:
    """The objective's records from the DPO benchmark's pairs (token ids recorded, as sampled rows carry
    them) and its settings."""
    if objective == "sft":
        return ([{**p, "generation2": None, "generation2_ids": None} for p in pairs],
                {"batch_size": 8})
    if objective == "dpo":
        return pairs, {"batch_size": 4, "dpo": {"beta": 0.1}}
    if objective == "grpo":
        rows = []
        for k in range(0, len(pairs) - 1, 2):  # one prompt's group: its pair and the next pair's continuations
            p, q = pairs[k], pairs[k + 1]
            for i, (text, ids) in enumerate(((p["generation1"], p["chosen_ids"]), (p["generation2"], p["rejected_ids"]),
                                             (q["generation1"], q["chosen_ids"]), (q["generation2"], q["rejected_ids"]))):
                rows.append({"prompt_id": f"p{k}", "prompt": p["prompt"], "prompt_ids": p["prompt_ids"],
                             "generation1": text, "generation1_ids": ids,
                             "generation1_reward": [1.0, 0.0, 0.6, 0.2][i]})
        return rows, {"batch_size": 2, "grpo": {"beta": 0.04, "num_iterations": 1}}
    if objective == "quark":
        rows = [{"prompt_id": f"{p['pair_id']}-{j}", "prompt": p["prompt"], "prompt_ids": p["prompt_ids"],
                 "generation1": p[g], "generation1_ids": p[f"{g}_ids"], "control": CONTROLS[j]}
                for p in pairs for j, g in enumerate(("generation1", "generation2"))]
        return rows, {"batch_size": 8, "quark": {"control_tokens": list(CONTROLS)}}
    raise ValueError(objective)


def reference_columns(objective: str, rows: list[dict], precision: str) -> None:
    """What the reference stage would cache for the objective (train.reference auto then reads them)."""
    from stages.services.models import load_causal_lm, load_tokenizer, resolve_model
    from stages.services.scoring import score
    from stages.data.tokens import of_record
    from stages.training.precision import cast_for_compute

    if objective not in ("dpo", "grpo"):
        return
    path = resolve_model("smollm2")
    tok = load_tokenizer(path)
    base = cast_for_compute(load_causal_lm(path).eval(), precision)
    gens = ("generation1", "generation2") if objective == "dpo" else ("generation1",)
    for i, gen in enumerate(gens, 1):
        sums, per_token = score(base, [of_record(tok, r, gen) for r in rows], tok.pad_token_id, 8, (64, 128),
                                per_token=objective == "grpo", desc="reference")
        for r, s, t in zip(rows, sums, per_token):
            r[f"reference_logp{i}"] = s
            if objective == "grpo":
                r["reference_token_logps1"] = t
    del base
    gc.collect()


def child(objective: str, precision: str, pairs_path: Path, steps: int, profile: bool = False,
          compiled: bool = False, casts: bool = False) -> dict:
    import torch

    from stages.config import TrainConfig
    from stages.services.training_setup import attach_reference, prepare
    from stages.training.allocator import current
    from stages.training.trainer import fit

    torch.manual_seed(0)
    rows, settings = records(objective, bench_dpo.load_pairs(pairs_path))
    reference_columns(objective, rows, precision)
    cfg = TrainConfig(objective=objective, model="smollm2", max_length=128, max_prompt_length=64, learning_rate=LR,
                      lr_scheduler="constant", max_steps=steps, epochs=100, checkpoint_every=10**6,
                      mixed_precision=precision, **settings)
    objective_, model, tokenizer = prepare(cfg, rows, seed=0)
    reference = attach_reference(objective_, cfg, rows, model)
    if compiled:  # inductor over the decoder body (the LM head is our own autograd Function)
        body = model.get_decoder()
        body.forward = torch.compile(body.forward, dynamic=True)
    per_step: list[int] = []
    collate = objective_.collate

    def counting(micro, tok):
        batch = collate(micro, tok)
        per_step.append(int(batch["attention_mask"].sum()))  # the policy's sequences, unshared
        return batch

    objective_.collate = counting
    gc.collect()
    reset = bench_dpo.reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if profile:  # every step by operator, self time: where a step's time goes
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as profiler

            with profiler(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                history = fit(model, tokenizer, objective_, rows, cfg, seed=0, resume_dir=Path(tmp))
            averages = prof.key_averages()
            print(averages.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
            profiled = by_category(averages)
        elif casts:  # every dtype cast of the run, by source (slow: a Python call per operator)
            from cast_counter import CastCounter

            with CastCounter() as counter:
                history = fit(model, tokenizer, objective_, rows, cfg, seed=0, resume_dir=Path(tmp))
        else:
            history = fit(model, tokenizer, objective_, rows, cfg, seed=0, resume_dir=Path(tmp))
        wall = time.perf_counter() - t0
    seconds = [h["tokens"] / h["tokens_per_s"] for h in history]  # each step's own window
    rates = [n / s for n, s in zip(per_step, seconds)]
    return {"objective": objective, "precision": precision, "reference": reference, "steps": len(history),
            "tokens": sum(per_step), "train_s": wall, "step_s": seconds,
            "tokens_per_s": statistics.median(rates[1:] if len(rates) > 1 else rates),
            "tokens_per_s_all_steps": sum(per_step) / sum(seconds),
            "train_peak_rss_gb": bench_dpo.gb(bench_dpo.status_kb("VmHWM")) if reset else None,
            "losses": [h["loss"] for h in history], "allocator": current(),
            "torch_threads": torch.get_num_threads(), **({"profile": profiled} if profile else {}),
            **({"casts": counter.table()} if casts else {})}


# Where a step's time goes, by kind of operator (self times, which add up to the run's time on the
# calling thread; intra-op threads work inside them).
CATEGORIES = (
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("attention", ("scaled_dot_product",)),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::fill_", "aten::zero_", "aten::cat", "aten::clone")),
    ("optimizer and clipping", ("adamw", "zero_grad", "linalg_vector_norm", "AccumulateGrad", "clip_grad")),
    ("log-softmax, KL and entropy over the vocabulary", ("log_softmax", "aten::exp", "HeadStats", "HeadLogProbs",
                                                          "aten::logsumexp")),
)


REST = "everything else (elementwise, autograd, Python)"


def by_category(averages) -> dict:
    """Self seconds per category and the rest, with the matmuls' FLOPs (the profiler counts them)."""
    out = {name: 0.0 for name, _ in CATEGORIES} | {REST: 0.0}
    mm_flops, ops = 0, []
    for e in averages:
        sec = e.self_cpu_time_total / 1e6
        name = next((c for c, keys in CATEGORIES if any(k.lower() in e.key.lower() for k in keys)), REST)
        out[name] += sec
        if name == "matmuls":
            mm_flops += int(e.flops or 0)
        ops.append((sec, e.key, e.count))
    ops.sort(reverse=True)
    return {"seconds": out, "total_s": sum(out.values()), "matmul_gflop": mm_flops / 1e9,
            "top_ops": [{"op": k, "self_s": round(t, 4), "calls": c} for t, k, c in ops[:15]]}


def explain(res: dict, peak: dict) -> str:
    """The profile as MFU's factors: MFU = (matmul rate / peak) x (matmul share of the time) x
    (model FLOPs / matmul FLOPs)."""
    p = res["profile"]
    sec, total = p["seconds"], p["total_s"]
    mm_rate = p["matmul_gflop"] / sec["matmuls"] if sec["matmuls"] else 0.0
    efficiency = mm_rate / peak["gflops"]
    model_gflop = 6 * N_PARAMS * res["tokens"] / 1e9
    ratio = model_gflop / p["matmul_gflop"] if p["matmul_gflop"] else 0.0
    lines = [f"{res['objective']} {res['precision']}: {total:.1f} s profiled over {res['steps']} steps, "
             f"{res['tokens']} tokens; peak {peak['gflops']:.0f} GFLOP/s "
             f"({', '.join(f'{k} {v:.0f}' for k, v in peak['shapes'].items())})"]
    for name, s in sorted(sec.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<50} {s:7.2f} s  {100 * s / total:5.1f}%")
    lines.append(f"  matmuls: {p['matmul_gflop']:.0f} GFLOP at {mm_rate:.0f} GFLOP/s = {pct(efficiency)} "
                 f"of the peak; model FLOPs (6N per token) {model_gflop:.0f} GFLOP = "
                 f"{ratio:.2f}x the matmuls' (a resident reference and recomputation "
                 f"are matmuls the model FLOPs do not count)" if p["matmul_gflop"] else "  matmuls: no FLOPs counted")
    mfu = model_gflop / total / peak["gflops"]
    lines.append(f"MFU (profiled) {pct(mfu)} = matmul efficiency {pct(efficiency)} x matmul share "
                 f"{pct(sec['matmuls'] / total)} x model/matmul FLOPs {ratio:.2f}")
    return "\n".join(lines)


def casts_table(res: dict) -> str:
    rows = res["casts"]
    lines = [f"{res['objective']} {res['precision']}: {res['steps']} step(s), {res['tokens']} tokens; "
             f"top {len(rows)} sources of dtype casts: {sum(r['casts'] for r in rows)} casts, "
             f"{sum(r['mb'] for r in rows):.0f} MB moved (read + written)"]
    lines += [f"  {r['mb']:9.1f} MB {r['casts']:6d}  {r['source']}" for r in rows]
    return "\n".join(lines)


def run_child(cmd: list[str], env: dict, log: Path) -> dict | None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(f"  FAILED: {(proc.stderr.strip().splitlines() or ['no output'])[-1]} (log: {log})", flush=True)
        return None
    return json.loads(line[len("BENCH_RESULT "):])


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"1 repeat of {QUICK_STEPS} steps (a few minutes)")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {STEPS})")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each configuration (default 1)")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="train.mixed_precision values to run")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL's DPOTrainer")
    ap.add_argument("--compile", action="store_true",
                    help="also run ours with torch.compile (inductor) over the decoder body: side ours-compiled")
    ap.add_argument("--profile", choices=OBJECTIVES, help="profile one objective's run by operator, in this process")
    ap.add_argument("--casts", choices=OBJECTIVES, help="count one objective's dtype casts by source, in this process")
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16", help="with --profile or --casts (default bf16)")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/train.json, train_quick.json)")
    ap.add_argument("--report", type=Path, help="print the table of a results JSON (benchmarks/results/train.json)")
    ap.add_argument("--child", nargs=2, metavar=("OBJECTIVE", "PRECISION"), help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=Path, default=RESULTS / "dpo_pairs.parquet", help=argparse.SUPPRESS)
    a = ap.parse_args()
    steps = a.steps or (QUICK_STEPS if a.quick else STEPS)
    if a.child:
        print("BENCH_RESULT " + json.dumps(child(a.child[0], a.child[1], a.pairs, steps, compiled=a.compile)),
              flush=True)
        return
    if a.report:
        print(report(json.loads(a.report.read_text())))
        return
    if a.profile:
        bench_dpo.build_pairs(a.pairs)
        peak = matmul_peak("bfloat16" if a.precision == "bf16" else "float32")
        res = child(a.profile, a.precision, a.pairs, a.steps or 4, profile=True)
        res.update(peak=peak, commit=bench_dpo.commit(), machine=bench_dpo.machine(),
                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        print(explain(res, peak))
        out = RESULTS / f"profile_{a.profile}_{a.precision}.json"
        out.write_text(json.dumps(res, indent=1))
        print(f"{a.profile} {a.precision}: {res['tokens_per_s']:.0f} tokens/s (profiled: slower than unprofiled); {out}")
        return
    if a.casts:
        bench_dpo.build_pairs(a.pairs)
        res = child(a.casts, a.precision, a.pairs, a.steps or 1, casts=True)
        res.update(commit=bench_dpo.commit(), machine=bench_dpo.machine(),
                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        print(casts_table(res))
        out = RESULTS / f"casts_{a.casts}_{a.precision}.json"
        out.write_text(json.dumps(res, indent=1))
        print(f"written: {out}")
        return

    import torch

    objectives = [o for o in a.objectives.split(",") if o]
    repeats = 1 if a.quick else a.repeats
    started = datetime.now(timezone.utc)
    peaks = {"no": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}
    print(f"peak: float32 {peaks['no']['gflops']:.0f} GFLOP/s, bfloat16 {peaks['bf16']['gflops']:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)", flush=True)
    bench_dpo.build_pairs(a.pairs)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="bench-hfds-")}
    from stages.training.allocator import jemalloc_library, preload_env

    if jemalloc_library():
        env = preload_env(env, jemalloc_library())  # what `align` runs on
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs = []
    precisions = [p for p in a.precisions.split(",") if p]
    jobs = [("ours", o, p) for o in objectives for p in precisions]
    if a.compile:
        jobs += [("ours-compiled", o, p) for o in objectives for p in precisions]
    if not a.no_trl and "dpo" in objectives:
        jobs += [("trl", "dpo", p) for p in precisions]
    for rep in range(repeats):
        for side, objective, precision in jobs[rep % len(jobs):] + jobs[: rep % len(jobs)]:
            name = f"{side}_{objective}_{precision}"
            if side.startswith("ours"):
                cmd = [sys.executable, __file__, "--child", objective, precision, "--pairs", str(a.pairs),
                       "--steps", str(steps), *(["--compile"] if side == "ours-compiled" else [])]
            else:
                dpo_steps = min(steps, bench_dpo.N_PAIRS // bench_dpo.BATCH)
                cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_dpo.py"), "--child", "trl_precompute",
                       "--pairs", str(a.pairs), "--steps", str(dpo_steps), "--precision", precision]
            res = run_child(cmd, env, logs / f"train-{name}-{rep}.log")
            if res is None:
                continue
            if side == "trl":  # bench_dpo's record: its rate over the steps' window
                res = {"objective": "dpo", "precision": precision, "reference": "cached", "steps": res["steps"],
                       "tokens": res["tokens"], "train_s": res["train_s"], "tokens_per_s": res["steps_tokens_per_s"],
                       "train_peak_rss_gb": res["train_peak_rss_gb"], "losses": res["losses"]}
            res.update(side=side, repeat=rep)
            runs.append(res)
            print(f"[{rep + 1}/{repeats}] {name}: {res['tokens_per_s']:.0f} tokens/s, training peak RSS "
                  f"{bench_dpo.fmt(res['train_peak_rss_gb'])} GB, losses {[round(x, 4) for x in res['losses'][:3]]}",
                  flush=True)

    for p in PRECISIONS:  # again after the runs; the better of the two
        again = matmul_peak("float32" if p == "no" else "bfloat16")
        peaks[p]["before_after"] = [peaks[p]["gflops"], again["gflops"]]
        peaks[p]["shapes"] = {k: max(v, again["shapes"][k]) for k, v in peaks[p]["shapes"].items()}
        peaks[p]["gflops"] = max(peaks[p]["shapes"].values())
    result = {"benchmark": "train", "commit": bench_dpo.commit(), "started": started.isoformat(timespec="seconds"),
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": bench_dpo.machine(),
              "torch_threads": torch.get_num_threads(), "steps": steps, "repeats": repeats, "peaks": peaks,
              "n_params": N_PARAMS, "objectives": objectives, "runs": runs}
    out = a.out or RESULTS / ("train_quick.json" if a.quick else "train.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"written: {out}")


def summarise(result: dict) -> tuple[dict, dict]:
    """Per configuration: median rate, model GFLOP/s, MFU against the best GEMM of each dtype and
    against the model-shaped one (2048x576x1536), peak memory; and the bf16 / float32 ratios."""
    peaks, runs = result["peaks"], result["runs"]
    shaped = {p: peaks[p]["shapes"]["2048x576x1536"] for p in PRECISIONS}
    rows = {}
    for r in runs:
        rows.setdefault(f"{r['side']}_{r['objective']}_{r['precision']}", []).append(r)
    out = {}
    for name, rs in rows.items():
        rate = statistics.median(r["tokens_per_s"] for r in rs)
        flops = 6 * result["n_params"] * rate / 1e9
        out[name] = {"side": rs[0]["side"], "objective": rs[0]["objective"], "precision": rs[0]["precision"],
                     "runs": len(rs), "reference": rs[0]["reference"], "tokens_per_s": rate, "model_gflops": flops,
                     "mfu": flops / peaks["bf16"]["gflops"], "mfu_model_shape": flops / shaped["bf16"],
                     "mfu_own_dtype": flops / peaks[rs[0]["precision"]]["gflops"],
                     "train_peak_rss_gb": bench_dpo.median([r["train_peak_rss_gb"] for r in rs])}
    ratios = {o: out[f"ours_{o}_bf16"]["tokens_per_s"] / out[f"ours_{o}_no"]["tokens_per_s"]
              for o in result.get("objectives", OBJECTIVES) if f"ours_{o}_no" in out and f"ours_{o}_bf16" in out}
    return out, ratios


def report(result: dict) -> str:
    """The results table; its last line `MFU fp32 X% bf16 Y% speedup Zx` (medians over the objectives,
    MFU against the bf16 peak, the machine's limit)."""
    rows, ratios = summarise(result)
    peaks = result["peaks"]
    lines = [f"CPU: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['torch_threads']} torch threads, "
             f"commit {result.get('commit', '?')}, {result['steps']} steps",
             f"peak: float32 {peaks['no']['gflops']:.0f} GFLOP/s, bfloat16 {peaks['bf16']['gflops']:.0f} GFLOP/s (best GEMM); "
             f"at SmolLM2's MLP shape 2048x576x1536: float32 {peaks['no']['shapes']['2048x576x1536']:.0f}, "
             f"bfloat16 {peaks['bf16']['shapes']['2048x576x1536']:.0f}", "",
             "| run | reference | tokens/s | model GFLOP/s | MFU (bf16 peak) | MFU (bf16, model-shaped GEMM) | "
             "MFU (own dtype's peak) | training peak RSS GB |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['reference']} | {r['tokens_per_s']:.0f} | {r['model_gflops']:.0f} | {pct(r['mfu'])} | "
                     f"{pct(r['mfu_model_shape'])} | {pct(r['mfu_own_dtype'])} | {bench_dpo.fmt(r['train_peak_rss_gb'])} |")
    lines.append("")
    lines += [f"bf16 / float32 {o}: {x:.2f}x tokens/s" for o, x in ratios.items()]
    for precision in PRECISIONS:
        o, t = rows.get(f"ours_dpo_{precision}"), rows.get(f"trl_dpo_{precision}")
        if o and t and o["train_peak_rss_gb"] and t["train_peak_rss_gb"]:
            lines.append(f"ours / TRL DPO at {precision}: {o['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s, "
                         f"{o['train_peak_rss_gb'] / t['train_peak_rss_gb']:.2f}x training peak RSS")
    ours = [r for r in rows.values() if r["side"] == "ours"]
    mfu = {p: bench_dpo.median([r["mfu"] for r in ours if r["precision"] == p]) for p in PRECISIONS}
    speedup = bench_dpo.median(list(ratios.values()))
    lines.append(f"MFU fp32 {pct(mfu['no'])} bf16 {pct(mfu['bf16'])} speedup {speedup:.2f}x" if speedup else "MFU: incomplete")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
