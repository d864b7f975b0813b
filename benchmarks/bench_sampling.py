"""Sampling and annotator throughput on SmolLM2 / MiniLM, side by side in one run.

Each configuration runs in its own process (fresh memory, no warm caches from the others), the
configurations alternate, and the table reports medians over repeats:
  - sampling tokens/s with `generate` at batch 1 and at the configured batch (KV cache, left padding),
    float32 (plain HF generate) against the bfloat16 sampler (`sample.dtype`), on the same prompts
    with the same seed and settings, 2 samples per prompt at top-p 0.9 as the movie flows sample;
    and the samples' reward distribution under reward_movies's reward model (when it has been
    trained under artifacts/), so a faster sampler that samples worse text would show;
  - annotator texts/s: the MiniLM reward model, the vaderSentiment rule, the SmolLM2 judge (pairs/s).

    .venv/bin/python benchmarks/bench_sampling.py [--repeats 3] [--batch 64] [--quick]
    .venv/bin/python benchmarks/bench_sampling.py --profile [--batch 32] [--new-tokens 32] [--top-p 1.0]
    .venv/bin/python benchmarks/bench_sampling.py --sweep

--sweep times one sample stage's sampling (`generate_hf`, model load included) at several
`sample.batch_size`s, in one process, alternating, 2 repeats: bench_online's shape (32 openings x 4,
bf16, top-p 1) at 32 and 128 sequences a call, and evaluate's (100 held-out openings x 2, float32,
top-p 0.9, top-k 50) at 32, 64 and 200. Writes benchmarks/results/sampling_batch_sweep.json.

--profile splits one `generate` call of ours (bench_online's shape: 4 samples per prompt, a batch of
32 sequences, top-p 1 and top-k 0 unless told) into its parts per decoding step: the model's own
forward pass (the same batch stepped by hand through the KV cache, no `generate`), the logits
processors (the log-prob recorder and NucleusSampler, timed around their calls); plus what a call
costs before its first step (loading the model and its first, warm-up call). Its `rest_ms_per_step`
(the call minus the two) is not a clean split: the hand-stepped forward has overheads of its own,
so it can come out negative; read the forward and the processors. Writes benchmarks/results/profile_sampling_batch<batch>_top_p<top-p>.json.
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

from stages.services.sample_metrics import bootstrap_ci  # noqa: E402


def prompts(n: int) -> list[str]:
    from stages.data.sources import read_corpus

    texts = read_corpus("movie_snippets").column("text").to_pylist()
    return [" ".join(t.split()[:6]) for t in texts[:n]]


def sample_rewards(texts: list[str], completions: list[str]) -> dict:
    """reward_movies's scores of the samples; {} when it is not trained here."""
    from stages.annotators.reward_model import DEFAULT_REWARD_MODEL, RewardModel
    from stages.config import annotator_step
    from stages.pipeline.errors import BadInput

    try:
        scorer = RewardModel(annotator_step(kind="reward_model", model=DEFAULT_REWARD_MODEL))
    except BadInput:
        return {}
    return {"rewards": scorer(texts, completions)["score"]}


def plain_generate(path, texts: list[str], cfg, seed: int) -> list[list[dict]]:
    """The baseline: transformers' `generate` as it comes (float32, its temperature and top-p
    warpers, torch.multinomial, num_return_sequences), batched and seeded as ours is."""
    import torch

    from stages.services.generation import encode_prompt
    from stages.services.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path).eval()
    encoded = [sum(encode_prompt(tok, t, cfg), []) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    per_call = max(1, cfg.batch_size // cfg.n)
    out: list[list[dict]] = [[] for _ in texts]
    torch.manual_seed(seed)
    for k in range(0, len(order), per_call):
        idx = order[k:k + per_call]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(encoded[i])) + encoded[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                                 top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.n,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for j, row in enumerate(gen[:, width:].tolist()):
            stop = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            out[idx[j // cfg.n]].append({"completion": tok.decode(row[:stop], skip_special_tokens=True),
                                         "completion_tokens": stop})
    return out


def child(kind: str, batch: int, n_prompts: int, new_tokens: int, seed: int) -> dict:
    import logging

    import torch

    torch.manual_seed(seed)
    if kind.startswith("sample"):
        from stages.config import SampleConfig
        from stages.services.models import resolve_model
        from stages.services.generation import generate_hf

        _, impl, dtype = kind.split(":")
        n = 1 if batch == 1 else 2
        cfg = SampleConfig(n=n, batch_size=batch, max_new_tokens=new_tokens, temperature=1.0, top_p=0.9, dtype=dtype)
        texts = prompts(max(1, n_prompts // n))
        t0 = time.perf_counter()
        if impl == "hf":
            out = plain_generate(resolve_model("smollm2"), texts, cfg, seed)
        else:
            out = generate_hf(resolve_model("smollm2"), texts, cfg, seed, logging.getLogger("bench"))
        wall = time.perf_counter() - t0
        tokens = sum(g["completion_tokens"] for gs in out for g in gs)
        rewards = sample_rewards([t for t, gs in zip(texts, out) for _ in gs], [g["completion"] for gs in out for g in gs]) \
            if batch > 1 else {}
        return {"kind": f"sample batch {batch} {impl} {dtype}", "tokens_per_s": tokens / wall, "tokens": tokens,
                "seconds": wall, **rewards}
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


def profile(batch: int, new_tokens: int, top_p: float, top_k: int) -> dict:
    """Where a decoding step of ours goes (see --profile above): milliseconds per step."""
    import logging

    import torch

    from stages.config import SampleConfig
    from stages.services import generation
    from stages.services.models import load_causal_lm, load_tokenizer, resolve_model

    path, log = resolve_model("smollm2"), logging.getLogger("bench")
    n = 4
    cfg = SampleConfig(n=n, batch_size=batch, max_new_tokens=new_tokens, temperature=1.0, top_p=top_p, top_k=top_k)
    texts = prompts(batch // n)
    timers = {"processors": 0.0}
    def timed(call):  # transformers reads a processor's signature: (self, input_ids, scores) exactly
        def timed_call(self, input_ids, scores):
            start = time.perf_counter()
            out = call(self, input_ids, scores)
            timers["processors"] += time.perf_counter() - start
            return out
        return timed_call

    for cls in (generation.TokenLogprobs, generation.NucleusSampler):
        cls.__call__ = timed(cls.__call__)
    t0 = time.perf_counter()
    generation.generate_hf(path, texts, cfg, 0, log)  # the first call: model load and warm-up included
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_causal_lm(path, generation.sampling_dtype(cfg.dtype)), load_tokenizer(path, padding_side="left")
    load = time.perf_counter() - t0
    timers["processors"] = 0.0
    t0 = time.perf_counter()
    out = generation.generate_hf(path, texts, cfg, 1, log)
    call = time.perf_counter() - t0 - load
    steps = max(g["completion_tokens"] for gs in out for g in gs)
    # The model alone: the same prompts' prefill, then one-token steps through the KV cache.
    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, generation.sampling_dtype(cfg.dtype)).eval()
    enc = tok(texts, return_tensors="pt", padding=True)
    ids, mask = enc.input_ids.repeat_interleave(n, 0), enc.attention_mask.repeat_interleave(n, 0)
    timing = []
    with torch.no_grad():
        for _ in range(2):  # the second pass is the one timed: the first warms the kernels up
            t0 = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            t1 = time.perf_counter()
            cache, nxt, m = out.cache, out.logits[:, -1:].argmax(-1), mask
            for _ in range(steps):
                m = torch.cat([m, torch.ones_like(nxt)], 1)
                out = model(input_ids=nxt, attention_mask=m, cache=cache, use_cache=True)
                cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
            timing = [t1 - t0, time.perf_counter() - t1]
    per_step = lambda seconds: 1000 * seconds / steps  # noqa: E731
    model_ms, processors_ms, call_ms = per_step(timing[1]), per_step(timers["processors"]), per_step(call)
    return {"batch": batch, "new_tokens": new_tokens, "top_p": top_p, "top_k": top_k, "steps": steps,
            "first_call_s": first, "model_load_s": load, "prefill_s": timing[0],
            "generate_ms_per_step": call_ms, "model_ms_per_step": model_ms, "processors_ms_per_step": processors_ms,
            "rest_ms_per_step": call_ms - model_ms - processors_ms - per_step(timing[0])}


SWEEP = [("bench_online", 32, 4, "bfloat16", 1.0, 0, (32, 128)), ("evaluate", 100, 2, "float32", 0.9, 50, (32, 64, 200))]


def sweep(repeats: int = 2) -> dict:
    """Seconds of generate_hf per shape and batch size (see --sweep above)."""
    import logging

    from stages.config import SampleConfig
    from stages.services import generation
    from stages.services.models import resolve_model

    path, log, out = resolve_model("smollm2"), logging.getLogger("bench"), {}
    for r in range(repeats):
        for name, n_prompts, n, dtype, top_p, top_k, batches in SWEEP:
            for batch in batches if r % 2 == 0 else reversed(batches):
                cfg = SampleConfig(n=n, batch_size=batch, max_new_tokens=32, temperature=1.0, top_p=top_p,
                                   top_k=top_k, dtype=dtype)
                t0 = time.perf_counter()
                generation.generate_hf(path, prompts(n_prompts), cfg, 0, log)
                out.setdefault(f"{name} batch {batch}", []).append(round(time.perf_counter() - t0, 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, help="sequences per generate call (default 64; --profile: 32)")
    ap.add_argument("--new-tokens", type=int, help="default 48 (--profile: 32)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="split a decoding step's time (see the docstring)")
    ap.add_argument("--top-p", type=float, default=1.0, help="--profile's top-p (top-k 0 when 1)")
    ap.add_argument("--sweep", action="store_true", help="sampling's wall at several sample.batch_size (see above)")
    ap.add_argument("--child", nargs=5)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_dpo import commit, machine

    if a.sweep:
        rows = sweep()
        out = ROOT / "benchmarks" / "results" / "sampling_batch_sweep.json"
        out.write_text(json.dumps({"machine": machine(), "commit": commit(), "seconds": rows}, indent=2))
        for key, seconds in rows.items():
            print(f"{key}: {statistics.median(seconds):.1f} s ({', '.join(map(str, seconds))})")
        return
    if a.profile:
        row = profile(a.batch or 32, a.new_tokens or 32, a.top_p, 0 if a.top_p >= 1 else 50)
        out = ROOT / "benchmarks" / "results" / f"profile_sampling_batch{a.batch or 32}_top_p{a.top_p:g}.json"
        out.write_text(json.dumps({"machine": machine(), "commit": commit(), **row}, indent=2))
        print(json.dumps(row, indent=2))
        return
    a.batch, a.new_tokens = a.batch or 64, a.new_tokens or 48
    if a.child:
        kind, batch, n, tokens, seed = a.child
        print(json.dumps(child(kind, int(batch), int(n), int(tokens), int(seed))))
        return
    repeats = 1 if a.quick else a.repeats
    many = 4 * a.batch if not a.quick else a.batch  # four full batches of sequences
    configs = [("sample:hf:float32", 1, 4 if a.quick else 8), ("sample:hf:float32", a.batch, many),
               ("sample:ours:float32", a.batch, many), ("sample:ours:bfloat16", a.batch, many),
               ("reward_model", 0, 256), ("vader", 0, 256), ("llm_judge", 0, 32)]
    results: dict[str, list[dict]] = {}
    for r in range(repeats):
        for kind, batch, n in configs:
            # Each repeat another seed (the same for every configuration): the rewards pool over repeats.
            proc = subprocess.run([sys.executable, __file__, "--child", kind, str(batch), str(n), str(a.new_tokens), str(r)],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"{kind} failed: {proc.stderr.strip().splitlines()[-1]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.setdefault(row["kind"], []).append(row)
            print(f"repeat {r + 1}: {row}", file=sys.stderr)
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    s1 = med(results["sample batch 1 hf float32"], "tokens_per_s")
    runs = {"HF generate, float32": results[f"sample batch {a.batch} hf float32"],
            "ours, float32": results[f"sample batch {a.batch} ours float32"],
            "ours, bfloat16 (the default here)": results[f"sample batch {a.batch} ours bfloat16"]}
    base = med(runs["HF generate, float32"], "tokens_per_s")
    lines = ["| measurement | median | unit |", "|---|---|---|",
             f"| sampling, batch 1, HF generate float32 | {s1:.1f} | tokens/s |"]
    for name, rows in runs.items():
        rate = med(rows, "tokens_per_s")
        lines.append(f"| sampling, batch {a.batch}, {name} | {rate:.1f} ({rate / base:.2f}x) | tokens/s |")
    lines.append(f"| speed-up, HF batch {a.batch} / batch 1 | {base / s1:.1f}x | (target >= 8x) |")
    for name, rows in runs.items():
        if "rewards" in rows[0]:
            scores = [x for row in rows for x in row["rewards"]]
            low, high = bootstrap_ci(scores, 0)
            q = statistics.quantiles(scores, n=4)
            lines.append(f"| samples' reward, {name}: mean [95% CI]; quartiles | {statistics.fmean(scores):.3f} "
                         f"[{low:.3f}, {high:.3f}]; {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} "
                         f"| reward_movies, {len(scores)} samples |")
    for kind, unit in (("reward_model", "texts/s"), ("vader", "texts/s"), ("llm_judge", "texts/s (pairs x 2 orders)")):
        lines.append(f"| annotator {kind} | {med(results[kind], 'texts_per_s'):.1f} | {unit} |")
    table = "\n".join(lines)
    for rows in results.values():  # the pooled scores are in the table; keep the JSON small
        for row in rows:
            row.pop("rewards", None)
    out = ROOT / "benchmarks" / "results" / "sampling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"repeats": repeats, "batch": a.batch, "results": results, "table": table}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
