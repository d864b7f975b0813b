"""DPO training speed and memory: our trainer vs TRL's DPOTrainer on SmolLM2-135M (CPU, fp32 or bf16).

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/bench_dpo.py [--repeats N] [--quick] [--precision no|bf16]

--precision bf16: ours with train.mixed_precision bf16 (bf16 weights, float32 masters; the cached
reference computed in bf16 too), TRL with `bf16=True` (its autocast over float32 weights).

Four configurations, each run in a fresh child process (this script with `--child NAME`), the
configurations alternating within every repeat (the starting one rotates from repeat to repeat):

    ours_cached       our trainer, reference log-probs cached (stages.reference.score on a separately
                      loaded base model, freed before training; its time is reported as precompute)
    ours_resident     our trainer, reference model resident (stages.train.attach_reference)
    trl_resident      trl.DPOTrainer, reference model resident
    trl_precompute    trl.DPOTrainer, precompute_ref_log_probs=True (its precompute pass is timed
                      separately; it runs inside the trainer's constructor)

Both sides train on exactly the same token ids, in the same batches, in the same order:
- the pairs are tokenised once, here, by our own token rules (stages/data/tokens.py: the prompt keeps
  its last max_prompt_length tokens, the completion its first max_length - max_prompt_length
  tokens, EOS included); our trainer reads those ids from the records, and TRL is handed them (a DPOTrainer subclass skips its own tokenisation; its
  collator's keep_start truncation at max_length=128 is then a no-op);
- our trainer shuffles (`epoch_batches`, seed 0; group_by_length=False); the TRL dataset is
  written in that same batch order and read with train_sampling_strategy="sequential".
Each child wraps its collate function to count the non-padding tokens it actually processed and
checks them against the expected count. Tokens = non-padding tokens of prompt+chosen and
prompt+rejected over the timed steps (identical for all four configurations).

Settings common to both: fp32 (or bf16 on both sides), batch 4 pairs, no gradient accumulation, AdamW (fused, torch's
defaults, weight decay 0), lr 5e-6 constant, no warm-up, max_grad_norm 1.0, sigmoid loss, beta 0.1,
dropout off (SmolLM2 has none), gradient checkpointing off (TRL defaults to on; `--gradient-checkpointing`
turns it on for both), 1 dataloader worker (the main process). Ours runs with its defaults
(lean layers on, shared prompts on); `--ours-set KEY=VALUE` changes a train setting for an ablation.
Both sides run on the same malloc: jemalloc (what `align` runs on when it is installed) unless
`--allocator system`.

Measured in each child: wall seconds of the training call only (`fit(...)` / `trainer.train()`;
model loading, data preparation and reference precompute excluded), tokens/s over that time, the
child's peak RSS (ru_maxrss over its whole life, loading included) and the peak RSS during training
alone (VmHWM reset through /proc/self/clear_refs just before the training call), and the first
steps' losses.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ("ours_cached", "ours_resident", "trl_resident", "trl_precompute")

N_PAIRS = 64
BATCH = 4
MAX_LENGTH = 128
MAX_PROMPT = 64
LR = 5e-6
BETA = 0.1
SEED = 0
STEPS = 16
QUICK_STEPS = 4
REF_BATCH = 8  # reference precompute batch (ours: ReferenceConfig.batch_size; TRL: precompute_ref_batch_size)


# --------------------------------------------------------------------------- pairs (parent)


def build_pairs(path: Path) -> None:
    """64 deterministic pairs from the movie snippets, tokenised once by our own code."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.data.sources import read_corpus
    from stages.services.models import load_tokenizer, resolve_model
    from stages.data.tokens import from_text, join
    from stages.training.trainer import epoch_batches

    tok = load_tokenizer(resolve_model("smollm2"))
    corpus = read_corpus("movie_snippets").to_pylist()
    ntok = lambda t: len(tok(t, add_special_tokens=False).input_ids)  # noqa: E731
    # Snippets of 22-40 tokens, so two of them make a completion near the 64-token completion budget.
    rng = np.random.RandomState(SEED)
    order = rng.permutation(len(corpus)).tolist()
    pos, neg, ctx = [], [], []
    for i in order:
        r = corpus[i]
        if len(pos) >= 2 * N_PAIRS and len(neg) >= 2 * N_PAIRS and len(ctx) >= 3 * N_PAIRS:
            break
        n = ntok(r["text"])
        if not 22 <= n <= 40:
            continue
        if r["valence"] >= 1.5 and len(pos) < 2 * N_PAIRS:
            pos.append(r["text"])
        elif r["valence"] <= -1.5 and len(neg) < 2 * N_PAIRS:
            neg.append(r["text"])
        elif -1.0 <= r["valence"] <= 1.0 and len(ctx) < 3 * N_PAIRS:
            ctx.append(r["text"])
    rows = []
    for k in range(N_PAIRS):
        # Prompts of natural lengths: one to three snippets (about 22 to 120 tokens), so some are
        # kept whole and some lose their start to the 64-token budget.
        prompt = " ".join(ctx[3 * k:3 * k + 1 + k % 3])
        chosen = " " + pos[2 * k] + " " + pos[2 * k + 1]  # the space on the completion's side
        rejected = " " + neg[2 * k] + " " + neg[2 * k + 1]
        p_c, m_c = join(from_text(tok, prompt, chosen), MAX_PROMPT, MAX_LENGTH)
        p_r, m_r = join(from_text(tok, prompt, rejected), MAX_PROMPT, MAX_LENGTH)
        n_prompt = m_c.index(1)
        full = tok(prompt, add_special_tokens=False).input_ids
        assert p_c[:n_prompt] == p_r[:n_prompt] == full[-min(len(full), MAX_PROMPT):] and m_r.index(1) == n_prompt
        rows.append({"pair_id": k, "prompt": prompt, "generation1": chosen, "generation2": rejected,
                     "prompt_ids": p_c[:n_prompt], "chosen_ids": p_c[n_prompt:], "rejected_ids": p_r[n_prompt:],
                     "generation1_ids": p_c[n_prompt:], "generation2_ids": p_r[n_prompt:],
                     "prompt_tokens_before_cut": len(full), "tokens": len(p_c) + len(p_r)})
    # The order our trainer visits them in (epoch 0, seed 0, no length grouping); TRL reads this order.
    batches = epoch_batches(rows, BATCH, SEED, 0, group_by_length=False)
    for pos_, r in enumerate(r for b in batches for r in b):
        r["batch_order"] = pos_
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def load_pairs(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(path).to_pylist(), key=lambda r: r["pair_id"])


def expected_tokens(rows: list[dict], steps: int) -> int:
    ordered = sorted(rows, key=lambda r: r["batch_order"])
    return sum(r["tokens"] for r in ordered[: steps * BATCH])


# --------------------------------------------------------------------------- child measurements


def rss_peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where not allowed."""
    from stages.training.allocator import reset_peak_rss

    return reset_peak_rss()


def gb(kb: int | None) -> float | None:
    return None if kb is None else kb * 1024 / 1e9


def child(name: str, pairs_path: Path, steps: int, grad_ckpt: bool, threads: int | None = None,
          ours_set: dict | None = None, precision: str = "no") -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    rows = load_pairs(pairs_path)
    want_tokens = expected_tokens(rows, steps)
    out: dict = {"config": name, "steps": steps, "tokens": want_tokens, "gradient_checkpointing": grad_ckpt,
                 "precision": precision,
                 "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()[0]}
    seen = {"per_batch": [], "batches": []}

    def count(batch, ids):
        seen["per_batch"].append(int(batch["attention_mask"].sum()))
        seen["batches"].append(ids)

    t_setup = time.perf_counter()
    if name.startswith("ours"):
        from stages.config import ReferenceConfig, TrainConfig
        from stages.services.models import load_causal_lm, load_tokenizer, resolve_model
        from stages.services.scoring import score
        from stages.data.tokens import of_record
        from stages.services.training_setup import attach_reference, prepare
        from stages.training.precision import cast_for_compute
        from stages.training.trainer import fit

        mode = name.split("_")[1]
        for r in rows:
            r["generation1_weight"] = r["generation2_weight"] = 1.0
        if mode == "cached":
            t0 = time.perf_counter()
            path = resolve_model("smollm2")
            tok = load_tokenizer(path)
            base = cast_for_compute(load_causal_lm(path).eval(), precision)  # as the reference stage does
            t1 = time.perf_counter()
            rcfg = ReferenceConfig(model="smollm2", max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT,
                                   batch_size=REF_BATCH)
            for col, gen in (("reference_logp1", "generation1"), ("reference_logp2", "generation2")):
                sums, _ = score(base, [of_record(tok, r, gen) for r in rows], tok.pad_token_id, rcfg.batch_size,
                                (rcfg.max_prompt_length, rcfg.max_length), desc="ref")
                for r, s in zip(rows, sums):
                    r[col] = s
            out["precompute_s"] = time.perf_counter() - t1
            out["precompute_load_s"] = t1 - t0
            del base, tok
            gc.collect()
        cfg = TrainConfig(objective="dpo", model="smollm2", batch_size=BATCH, max_length=MAX_LENGTH,
                          max_prompt_length=MAX_PROMPT, learning_rate=LR, max_steps=steps, epochs=100,
                          lr_scheduler="constant", checkpoint_every=10**6, reference=mode, dpo={"beta": BETA},
                          group_by_length=False, gradient_checkpointing=grad_ckpt, max_grad_norm=1.0,
                          weight_decay=0.0, warmup_steps=0, grad_accum=1, mixed_precision=precision,
                          **(ours_set or {}))
        out["ours_set"] = ours_set or {}
        objective, model, tokenizer = prepare(cfg, rows, seed=SEED)
        got = attach_reference(objective, cfg, rows, model)
        assert got == mode, (got, mode)
        collate = objective.collate

        def counting_collate(micro, tok_):
            batch = collate(micro, tok_)
            count(batch, [r["pair_id"] for r in micro])
            return batch

        objective.collate = counting_collate
        out["setup_s"] = time.perf_counter() - t_setup
        gc.collect()
        out["peak_rss_before_train_gb"] = gb(rss_peak_kb())
        out["rss_before_train_gb"] = gb(status_kb("VmRSS"))
        before = rss_peak_kb()
        reset = reset_peak()
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), cpu_s()
            history = fit(model, tokenizer, objective, rows, cfg, seed=SEED, resume_dir=Path(tmp))
            out["train_s"], out["train_cpu_s"] = time.perf_counter() - t0, cpu_s() - c0
        out["steps_s"] = sum(h["tokens"] / h["tokens_per_s"] for h in history)  # per-step windows, summed
        out["losses"] = [h["loss"] for h in history]
        out["grad_norms"] = [h["grad_norm"] for h in history]
    else:
        import datasets
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        from stages.services.models import load_causal_lm, load_tokenizer, resolve_model

        datasets.disable_progress_bars()
        precompute = name == "trl_precompute"
        timing: dict = {}

        class PreTokenized(DPOTrainer):
            """The pairs arrive already tokenised (by our token rules): skip TRL's tokenisation."""

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset

            def _precompute_ref_logps(self, dataset, name_, batch_size):
                t = time.perf_counter()
                res = super()._precompute_ref_logps(dataset, name_, batch_size)
                timing["precompute_s"] = timing.get("precompute_s", 0.0) + time.perf_counter() - t
                return res

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timing["train_begin"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timing["step_end"] = time.perf_counter()

        path = resolve_model("smollm2")
        tok = load_tokenizer(path)
        model = load_causal_lm(path)
        ordered = sorted(rows, key=lambda r: r["batch_order"])
        ds = datasets.Dataset.from_list([{"pair_id": r["pair_id"], "prompt_ids": r["prompt_ids"],
                                          "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
                                         for r in ordered])
        args = DPOConfig(
            output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", beta=BETA,
            loss_type=["sigmoid"], max_length=MAX_LENGTH, truncation_mode="keep_start", bf16=precision == "bf16", fp16=False,
            gradient_checkpointing=grad_ckpt, precompute_ref_log_probs=precompute,
            precompute_ref_batch_size=REF_BATCH, train_sampling_strategy="sequential", report_to="none",
            dataloader_num_workers=0, save_strategy="no", logging_steps=1, use_cpu=True, seed=SEED,
            disable_tqdm=True, remove_unused_columns=True,
        )
        trainer = PreTokenized(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                               callbacks=[Clock()])
        if precompute:
            assert trainer.ref_model is None and "precompute_s" in timing
            out["precompute_s"] = timing["precompute_s"]
        else:
            assert trainer.ref_model is not None
        # Count what the training dataloader really collates (TRL drops pair_id as an unused column,
        # so its batches are checked by their token counts only).
        collator = trainer.data_collator

        def counting_collator(examples):
            batch = collator(examples)
            count(batch, None)
            return batch

        trainer.data_collator = counting_collator
        out["setup_s"] = time.perf_counter() - t_setup
        gc.collect()
        out["peak_rss_before_train_gb"] = gb(rss_peak_kb())
        out["rss_before_train_gb"] = gb(status_kb("VmRSS"))
        before = rss_peak_kb()
        reset = reset_peak()
        t0, c0 = time.perf_counter(), cpu_s()
        trainer.train()
        out["train_s"], out["train_cpu_s"] = time.perf_counter() - t0, cpu_s() - c0
        out["steps_s"] = timing["step_end"] - timing["train_begin"]
        logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        out["losses"] = [h["loss"] for h in logs]
        out["grad_norms"] = [h.get("grad_norm") for h in logs]
        assert trainer.state.global_step == steps, trainer.state.global_step

    after = rss_peak_kb()
    out["peak_rss_gb"] = gb(max(before, after))  # the whole child, loading and precompute included
    out["train_peak_rss_gb"] = gb(status_kb("VmHWM")) if reset else None  # high-water mark since the reset
    from stages.training.allocator import current

    out["allocator"] = current()  # as loaded in this child, not as asked
    # The batches really collated during training must be the expected ones, step by step. (A
    # dataloader may look one batch ahead; such a batch is collated but never trained on.)
    ordered = sorted(rows, key=lambda r: r["batch_order"])
    want_per_batch = [sum(r["tokens"] for r in ordered[k * BATCH:(k + 1) * BATCH]) for k in range(steps)]
    assert seen["per_batch"][:steps] == want_per_batch, (seen["per_batch"], want_per_batch)
    out["collated_batches"] = len(seen["per_batch"])
    if name.startswith("ours"):
        want_ids = [[r["pair_id"] for r in ordered[k * BATCH:(k + 1) * BATCH]] for k in range(steps)]
        assert seen["batches"] == want_ids, "our trainer did not visit the batches in the expected order"
    out["tokens_per_s"] = want_tokens / out["train_s"]
    out["steps_tokens_per_s"] = want_tokens / out["steps_s"]
    out["tokens_per_cpu_s"] = want_tokens / out["train_cpu_s"]
    out["loadavg_end"] = os.getloadavg()[0]
    return out


# --------------------------------------------------------------------------- parent


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for name in CONFIGS:
        rs = [r for r in runs if r["config"] == name and "error" not in r]
        if not rs:
            continue
        first = [median([r["losses"][i] for r in rs if len(r["losses"]) > i]) for i in range(4)]
        summary[name] = {
            "runs": len(rs),
            "tokens": rs[0]["tokens"],
            "tokens_per_s": median([r["tokens_per_s"] for r in rs]),
            "tokens_per_s_all": [round(r["tokens_per_s"], 2) for r in rs],
            "steps_tokens_per_s": median([r["steps_tokens_per_s"] for r in rs]),
            "tokens_per_cpu_s": median([r["tokens_per_cpu_s"] for r in rs]),
            "loadavg_start": median([r["loadavg_start"] for r in rs]),
            "train_s": median([r["train_s"] for r in rs]),
            "peak_rss_gb": median([r["peak_rss_gb"] for r in rs]),
            "train_peak_rss_gb": median([r["train_peak_rss_gb"] for r in rs]),
            "rss_before_train_gb": median([r["rss_before_train_gb"] for r in rs]),
            "precompute_s": median([r.get("precompute_s") for r in rs]),
            "first_losses": first,
        }
    ratios = {}
    for ours, trl, label in (("ours_resident", "trl_resident", "resident"), ("ours_cached", "trl_precompute", "cached")):
        if ours in summary and trl in summary:
            o, t = summary[ours], summary[trl]
            ratios[label] = {
                "tokens_per_s": o["tokens_per_s"] / t["tokens_per_s"],
                "tokens_per_cpu_s": o["tokens_per_cpu_s"] / t["tokens_per_cpu_s"],
                "peak_rss": o["peak_rss_gb"] / t["peak_rss_gb"],
                "train_peak_rss": (o["train_peak_rss_gb"] / t["train_peak_rss_gb"]
                                   if o["train_peak_rss_gb"] and t["train_peak_rss_gb"] else None),
            }
    return {"configs": summary, "ratios": ratios}


def table(result: dict) -> str:
    s, ratios = result["configs"], result["ratios"]
    lines = ["| config | tokens/s (median) | runs (tokens/s each) | tokens per CPU-s | peak RSS GB (child) | "
             "peak RSS GB (training) | precompute s |", "|---|---|---|---|---|---|---|"]
    for name, v in s.items():
        each = ", ".join(f"{x:.1f}" for x in v["tokens_per_s_all"])
        lines.append(f"| {name} | {fmt(v['tokens_per_s'], 1)} | {v['runs']} ({each}) | {fmt(v['tokens_per_cpu_s'], 1)} | "
                     f"{fmt(v['peak_rss_gb'])} | {fmt(v['train_peak_rss_gb'])} | {fmt(v['precompute_s'], 1)} |")
    lines += ["", "| ours / TRL | tokens/s | target | tokens per CPU-s | peak RSS (child) | target | peak RSS (training) |",
              "|---|---|---|---|---|---|---|"]
    targets = {"resident": (">= 1.5", "<= 0.75"), "cached": (">= 1.2", "-")}
    for label, r in ratios.items():
        pair = "ours_resident / trl_resident" if label == "resident" else "ours_cached / trl_precompute"
        lines.append(f"| {pair} | {fmt(r['tokens_per_s'])}x | {targets[label][0]} | {fmt(r['tokens_per_cpu_s'])}x | "
                     f"{fmt(r['peak_rss'])}x | "
                     f"{targets[label][1]} | {fmt(r['train_peak_rss'])}x |")
    lines += ["", "| step | " + " | ".join(s) + " |", "|---" * (len(s) + 1) + "|"]
    for i in range(4):
        cells = [fmt(v["first_losses"][i], 4) if v["first_losses"][i] is not None else "-" for v in s.values()]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    from stages.pipeline.provenance import cpu_model

    cpu = cpu_model()
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version,
            "mem_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9}


def commit() -> str:
    """The checkout's short commit, as the results JSONs record it ('' outside a git checkout)."""
    from stages.pipeline.provenance import git_state

    return git_state().get("commit", "")[:7]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration (default 3)")
    ap.add_argument("--quick", action="store_true", help=f"1 repeat of {QUICK_STEPS} steps (a smoke check)")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {STEPS}, max 16)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--gradient-checkpointing", action="store_true", help="turn it on for both sides")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads in each child (default: torch's own, the core count)")
    ap.add_argument("--allocator", choices=["jemalloc", "system"], default="jemalloc",
                    help="malloc of every child, ours and TRL's alike (default jemalloc, as `align` runs)")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a train setting in our children (YAML value; repeatable), e.g. lean_layers=false "
                         "or share_prompt=false")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in the ledger (<out>_runs.jsonl) with the same settings; run the rest")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/dpo.json)")
    ap.add_argument("--precision", choices=["no", "bf16"], default="no",
                    help="no: float32 on both sides (default); bf16: ours mixed_precision bf16, TRL bf16=True")
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--ours-set-json", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=Path, default=RESULTS / "dpo_pairs.parquet", help=argparse.SUPPRESS)
    a = ap.parse_args()
    steps = a.steps or (QUICK_STEPS if a.quick else STEPS)
    if not 1 <= steps <= N_PAIRS // BATCH:
        ap.error(f"--steps must be in 1..{N_PAIRS // BATCH} (one epoch of the {N_PAIRS} pairs)")

    if a.child:
        res = child(a.child, a.pairs, steps, a.gradient_checkpointing, a.threads, json.loads(a.ours_set_json),
                    a.precision)
        print("BENCH_RESULT " + json.dumps(res), flush=True)
        return

    repeats = 1 if a.quick else a.repeats
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown config(s): {bad}")
    out = a.out or RESULTS / (("dpo_quick" if a.quick else "dpo") + ("_bf16" if a.precision == "bf16" else "") + ".json")
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    build_pairs(a.pairs)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="bench-hfds-")}
    if a.allocator == "jemalloc":
        from stages.training.allocator import jemalloc_library, preload_env

        library = jemalloc_library()
        if library is None:
            ap.error("--allocator jemalloc: jemalloc is not installed (apt-get install libjemalloc2), "
                     "or use --allocator system")
        env = preload_env(env, library)
    from stages.config import apply_overrides
    from stages.pipeline.errors import BadInput

    try:
        ours_set = apply_overrides({}, a.ours_set)  # the CLI's --set parsing: dotted keys, YAML values
    except BadInput as e:
        ap.error(f"--ours-set: {e}")
    # Every finished child is appended to a ledger at once, so a killed benchmark loses at most the
    # run in progress; --resume picks up from there.
    ledger = out.with_name(out.stem + "_runs.jsonl")
    key = {"steps": steps, "gradient_checkpointing": a.gradient_checkpointing, "threads": a.threads,
           "allocator": a.allocator, "ours_set": ours_set, "precision": a.precision}
    runs = []
    if a.resume and ledger.exists():
        runs = [r for r in map(json.loads, ledger.read_text().splitlines())
                if r.get("key") == key and "error" not in r and r["repeat"] < repeats and r["config"] in configs]
        print(f"resuming: {len(runs)} runs already in {ledger}", flush=True)
    else:
        ledger.write_text("")
    done = {(r["repeat"], r["config"]) for r in runs}
    started = datetime.now(timezone.utc)
    for rep in range(repeats):
        order = configs[rep % len(configs):] + configs[: rep % len(configs)]  # rotate the first config
        for name in order:
            if (rep, name) in done:
                continue
            began = datetime.now(timezone.utc).isoformat(timespec="seconds")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--pairs", str(a.pairs),
                   "--steps", str(steps), "--precision", a.precision] + (["--gradient-checkpointing"] if a.gradient_checkpointing else []) \
                + (["--threads", str(a.threads)] if a.threads else []) + (["--ours-set-json", json.dumps(ours_set)] if ours_set else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            (logs / f"{out.stem}-{name}-{rep}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
            line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("BENCH_RESULT ")), None)
            if proc.returncode != 0 or line is None:
                res = {"config": name, "repeat": rep, "error": proc.stderr.strip().splitlines()[-1:] or ["no output"]}
                print(f"[{rep + 1}/{repeats}] {name}: FAILED ({res['error'][0]}); see {logs / f'{out.stem}-{name}-{rep}.log'}",
                      flush=True)
            else:
                res = json.loads(line[len("BENCH_RESULT "):])
                res["repeat"], res["process_wall_s"], res["began"] = rep, wall, began
                print(f"[{rep + 1}/{repeats}] {name}: {res['tokens_per_s']:.1f} tokens/s "
                      f"({res['tokens_per_cpu_s']:.1f} per CPU-s, load {res['loadavg_start']:.1f}), train {res['train_s']:.1f} s, "
                      f"peak RSS {res['peak_rss_gb']:.2f} GB (training {fmt(res['train_peak_rss_gb'])}), "
                      f"precompute {fmt(res.get('precompute_s'), 1)} s, losses {[round(x, 4) for x in res['losses'][:4]]}",
                      flush=True)
            res["key"] = key
            with ledger.open("a") as f:
                f.write(json.dumps(res) + "\n")
            runs.append(res)
    runs.sort(key=lambda r: (r["repeat"], r.get("began", "")))
    result = {"benchmark": "dpo", "started": started.isoformat(timespec="seconds"),
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "settings": {"model": f"smollm2 (SmolLM2-135M-Instruct, {'bf16' if a.precision == 'bf16' else 'fp32'})", "pairs": N_PAIRS, "batch_pairs": BATCH,
                           "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT, "steps": steps,
                           "repeats": repeats, "learning_rate": LR, "beta": BETA, "loss": "sigmoid",
                           "lr_scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 1.0,
                           "optimizer": "AdamW fused, weight_decay 0",
                           "dtype": "bfloat16" if a.precision == "bf16" else "float32",
                           "gradient_checkpointing": a.gradient_checkpointing, "reference_batch_size": REF_BATCH,
                           "threads": a.threads or "torch default", "allocator": a.allocator,
                           "ours_set": ours_set,
                           "order": "our epoch_batches(seed 0, group_by_length=False); TRL sequential over the same order"},
              **summarise(runs), "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
