"""Where a DPO step's time and memory go: torch.profiler over a few steps of one configuration.

    .venv/bin/python benchmarks/profile_dpo.py ours_resident [--steps 3] [--top 25]

Same set-up as bench_dpo.py (its pairs Parquet, written by a bench_dpo run; same settings); the
first step is skipped as warm-up and the rest are profiled. Prints the ops by self CPU time,
grouped into model parts, and RSS at each step start.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_dpo as B  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", choices=B.CONFIGS)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--pairs", type=Path, default=B.RESULTS / "dpo_pairs.parquet")
    ap.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace here")
    a = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile, schedule

    rows = B.load_pairs(a.pairs)
    marks: list[tuple[float, int | None, int | None]] = []
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=a.steps - 1),
                   profile_memory=False, with_stack=False)

    def step_begin():
        if marks:
            prof.step()
        marks.append((time.perf_counter(), B.status_kb("VmRSS"), B.status_kb("VmHWM")))

    if a.config.startswith("ours"):
        from stages.config import ReferenceConfig, TrainConfig
        from stages.services.models import load_causal_lm, load_tokenizer, resolve_model
        from stages.services.scoring import score
        from stages.data.tokens import of_record
        from stages.services.training_setup import attach_reference, prepare
        from stages.training.trainer import fit

        mode = a.config.split("_")[1]
        for r in rows:
            r["generation1_weight"] = r["generation2_weight"] = 1.0
        if mode == "cached":
            path = resolve_model("smollm2")
            tok, base = load_tokenizer(path), load_causal_lm(path).eval()
            rcfg = ReferenceConfig(model="smollm2", max_length=B.MAX_LENGTH, max_prompt_length=B.MAX_PROMPT,
                                   batch_size=B.REF_BATCH)
            for col, gen in (("reference_logp1", "generation1"), ("reference_logp2", "generation2")):
                sums, _ = score(base, [of_record(tok, r, gen) for r in rows[:16]], tok.pad_token_id, rcfg.batch_size,
                                (rcfg.max_prompt_length, rcfg.max_length), desc="ref")
                for r, s in zip(rows, sums):
                    r[col] = s
            for r in rows[16:]:  # only the profiled steps' pairs need real values; these are never reached
                r["reference_logp1"] = r["reference_logp2"] = 0.0
            del base
        cfg = TrainConfig(objective="dpo", model="smollm2", batch_size=B.BATCH, max_length=B.MAX_LENGTH,
                          max_prompt_length=B.MAX_PROMPT, learning_rate=B.LR, max_steps=a.steps, epochs=100,
                          lr_scheduler="constant", checkpoint_every=10**6, reference=mode, dpo={"beta": B.BETA},
                          group_by_length=False)
        objective, model, tokenizer = prepare(cfg, rows, seed=B.SEED)
        attach_reference(objective, cfg, rows, model)
        collate = objective.collate

        def wrapped(micro, tok_):
            step_begin()
            return collate(micro, tok_)

        objective.collate = wrapped
        with prof, tempfile.TemporaryDirectory() as tmp:
            fit(model, tokenizer, objective, rows, cfg, seed=B.SEED, resume_dir=Path(tmp))
    else:
        import datasets
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        from stages.services.models import load_causal_lm, load_tokenizer, resolve_model

        class PreTokenized(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset

        class Hook(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                step_begin()

        path = resolve_model("smollm2")
        tok, model = load_tokenizer(path), load_causal_lm(path)
        ordered = sorted(rows, key=lambda r: r["batch_order"])
        ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in ordered])
        args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B.BATCH, max_steps=a.steps,
                         learning_rate=B.LR, lr_scheduler_type="constant", max_grad_norm=1.0, beta=B.BETA,
                         max_length=B.MAX_LENGTH, bf16=False, gradient_checkpointing=False,
                         precompute_ref_log_probs=a.config == "trl_precompute", precompute_ref_batch_size=B.REF_BATCH,
                         train_sampling_strategy="sequential", report_to="none", dataloader_num_workers=0,
                         save_strategy="no", logging_steps=1, use_cpu=True, seed=B.SEED, disable_tqdm=True)
        trainer = PreTokenized(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Hook()])
        with prof:
            trainer.train()
    marks.append((time.perf_counter(), B.status_kb("VmRSS"), B.status_kb("VmHWM")))

    print(f"{a.config}: step wall s:", [round(marks[i + 1][0] - marks[i][0], 1) for i in range(len(marks) - 1)])
    print("RSS GB at step starts (current / high-water):",
          [(round(B.gb(r), 2), round(B.gb(h), 2)) for _, r, h in marks])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
    if a.trace:
        prof.export_chrome_trace(str(a.trace))


if __name__ == "__main__":
    main()
