"""Online RL on the movie task, ours against TRL's GRPOTrainer and RLOOTrainer, side by side.

    .venv/bin/pip install -e '.[bench]'          # TRL 1.16
    .venv/bin/python benchmarks/bench_online.py [--repeats 3] [--prompts 32] [--rounds 3] [--quick] [--precision bf16]

Run reward_movies.yaml first: its MiniLM reward model scores every sample, ours through the
reward_model annotator and TRL's as its reward function (the same class, the same weights).

Four configurations, each in its own process, alternating (the starting one rotates each repeat):

    ours_grpo   align's flow load_prompts -> sample -> annotate -> build_pool -> reference -> train
                with train.objective grpo (configs/bases/movies_online.yaml for the data)
    trl_grpo    trl.GRPOTrainer on the same prompts, reward function and settings
    ours_rloo   the same flow with train.objective rl (RLOO, KL folded into the reward)
    trl_rloo    trl.RLOOTrainer

Common settings: SmolLM2-135M as policy and reference; the first P training openings of the movie
split (6 words each, as every movie flow cuts them); 4 samples per prompt, at most 32 new tokens,
temperature 1, no top-p or top-k (pure sampling, TRL's default; ours is told top_k 0); generation
batches of 32 sequences (--generation-batch: ours' sample.batch_size only cuts a round's sampling
into calls, where TRL's generation_batch_size also sets how many samples one generation serves: at
32 TRL samples 4 times a round, each time from a policy 2 optimizer steps on; at P x 4 both sides
sample the round once, from its starting policy, and train 8 steps on it: the same algorithm); 2 prompts (8 sequences) per micro-batch and 2 micro-batches per optimizer
step (--micro-prompts 4: one micro-batch of 16), so P x 4 / 16 steps per round; one policy update per batch of samples (num_iterations 1); AdamW, lr 1e-5 constant, no warm-up, weight decay 0, max grad norm 1;
KL coefficient 0.04 (GRPO: k3 per token; RLOO: in the reward); GRPO's loss per sequence token mean
(TRL loss_type "grpo"), advantages scaled by the group's std; float32 training on both sides
(--precision bf16: ours train.mixed_precision bf16, TRL bf16=True, on both sides), without gradient checkpointing (TRL's default turns it on; it is told not to). Ours
samples with its defaults (bfloat16 where the CPU has it, NucleusSampler) and reads the reference's
log-probs from the reference stage; TRL generates with `generate` in float32 inside training and
keeps the reference model resident. Both run on jemalloc when it is installed (as `align` does).

`--configs ours_grpo --variant reference.batch_size=32` runs a subset, and ours once more with `--set`
overrides (a configuration `ours_grpo+reference.batch_size=32`), alternating with the others: a
setting of ours measured side by side against ours as it is.

Measured per configuration (median of the repeats): the round's wall time from the process's start
to the trained policy saved, imports included (ours: run_flow_locally over the round's stages, every
model load included; TRL: importing trl, loading the policy and the reward model, building the
trainer, which loads the reference, trainer.train() and save_pretrained), split into sampling (ours:
the sample stage; TRL: time inside generate), scoring (annotate; TRL's reward function) and the
rest (ours: build_pool, reference and train; TRL: everything else in train()), tokens generated per
second of sampling, and the process's peak RSS.

Then, with --rounds R (default 3), each configuration trains on R x P x 4 samples (ours: R online
rounds; TRL: R epochs over the P prompts, as many samples) and a fresh process samples one
continuation of each of H held-out openings from the trained policy (ours' sampler in float32, the
same seed for every policy) and scores it: mean reward with its bootstrap 95% interval, beside the
base policy's.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # each configuration's wall counts from its process's start: imports included

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ["ours_grpo", "trl_grpo", "ours_rloo", "trl_rloo"]
N, NEW_TOKENS, TEMPERATURE, TOP_P, TOP_K = 4, 32, 1.0, 1.0, 0
GROUPS_PER_STEP, LR, KL = 4, 1.0e-5, 0.04
SEQS_PER_STEP = GROUPS_PER_STEP * N


def micro_batches() -> tuple[int, int]:
    """--micro-prompts, handed to the children in BENCH_ONLINE_MICRO_PROMPTS: (prompts per
    micro-batch, micro-batches per optimizer step), on both sides; a step is always 4 prompts."""
    groups = int(os.environ.get("BENCH_ONLINE_MICRO_PROMPTS", "2"))
    return groups, GROUPS_PER_STEP // groups


def precision() -> str:
    """--precision, handed to the children in BENCH_ONLINE_PRECISION: no (float32) or bf16."""
    return os.environ.get("BENCH_ONLINE_PRECISION", "no")


def generation_batch() -> int:
    """--generation-batch, handed to the children in BENCH_ONLINE_GENERATION_BATCH: sequences sampled
    per `generate` call on both sides (ours: sample.batch_size; TRL: generation_batch_size)."""
    return int(os.environ.get("BENCH_ONLINE_GENERATION_BATCH", "32"))


def flow_config(objective: str, prompts: int, rounds: int) -> str:
    """The YAML of our side: the movie data of bases/movies_online.yaml, the settings above."""
    train = {"grpo": f"grpo: {{beta: {KL}, num_iterations: 1, loss_type: grpo, scale_rewards: true}}",
             "rl": f"rl: {{kl_coef: {KL}}}"}[objective]
    return f"""extends: {ROOT / 'configs' / 'bases' / 'movies_online.yaml'}
experiment: bench_online_{objective}
rounds: {rounds}
stages: [load_prompts, sample, annotate, build_pool, reference, train]
sample: {{n: {N}, max_new_tokens: {NEW_TOKENS}, temperature: {TEMPERATURE}, top_p: {TOP_P}, top_k: {TOP_K},
         batch_size: {generation_batch()},
         max_prompts: {prompts}}}
build_pool: {{kind: rl}}
train:
  objective: {objective}
  learning_rate: {LR}
  lr_scheduler: constant
  batch_size: {micro_batches()[0]}
  grad_accum: {micro_batches()[1]}
  max_grad_norm: 1.0
  mixed_precision: {precision()}
  {train}
"""


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child_ours(objective: str, prompts: int, rounds: int, work: Path, overrides: list[str]) -> dict:
    from stages.config import load_config
    from stages.pipeline.runner import run_flow_locally
    from stages.pipeline.store import ArtifactStore

    path = work / f"{objective}.yaml"
    path.write_text(flow_config(objective, prompts, rounds))
    cfg = load_config(path, overrides)
    store = ArtifactStore(str(work / "artifacts"))
    reward_model = ROOT / "artifacts" / "reward_movies"
    (work / "artifacts").mkdir(exist_ok=True)
    os.symlink(reward_model, work / "artifacts" / "reward_movies")  # the annotator's default model
    results = run_flow_locally(cfg, store)
    wall = time.perf_counter() - T_START
    stage = {(r.round, r.stage): r for r in results}
    sampling = sum(r.wall_seconds for r in results if r.stage == "sample")
    scoring = sum(r.wall_seconds for r in results if r.stage == "annotate")
    tokens = sum(r.metrics["samples"] * r.metrics["mean_completion_tokens"] for r in results if r.stage == "sample")
    model = stage[(rounds - 1, "train")].path + "/model"
    return {"wall_s": wall, "sampling_s": sampling, "scoring_s": scoring, "rest_s": wall - sampling - scoring,
            "tokens": tokens, "tokens_per_s": tokens / sampling, "peak_rss_gb": peak_rss_gb(), "model": model,
            "stages_s": {f"{r.stage}@{r.round}": round(r.wall_seconds, 2) for r in results}}


def child_trl(kind: str, prompts: list[str], rounds: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from stages.annotators.reward_model import RewardModel
    from stages.config import annotator_step
    from stages.pipeline.refs import ArtifactRef
    from stages.services.models import load_causal_lm, load_tokenizer, resolve_model

    timers = {"sampling_s": 0.0, "scoring_s": 0.0, "tokens": 0}
    path = resolve_model("smollm2")
    model = load_causal_lm(path)  # float32, as ours trains
    tokenizer = load_tokenizer(path, padding_side="left")
    scorer = RewardModel(annotator_step(kind="reward_model", model=ArtifactRef(
        experiment="reward_movies", stage="train", file="model")))

    def reward(prompts, completions, **_):
        start = time.perf_counter()
        scores = scorer(list(prompts), list(completions))["score"]
        timers["scoring_s"] += time.perf_counter() - start
        return scores

    generate = model.generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        timers["sampling_s"] += time.perf_counter() - start
        width = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]
        for row in out[:, width:].tolist():
            timers["tokens"] += row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        return out

    model.generate = timed_generate
    steps = rounds * len(prompts) * N // SEQS_PER_STEP
    common = dict(output_dir=str(work / "trl"), per_device_train_batch_size=micro_batches()[0] * N,
                  gradient_accumulation_steps=micro_batches()[1], generation_batch_size=generation_batch(), num_generations=N,
                  max_completion_length=NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=KL,
                  num_iterations=1, max_steps=steps, num_train_epochs=rounds, logging_steps=1, save_strategy="no",
                  report_to=[], use_cpu=True, seed=0, bf16=precision() == "bf16", dataloader_num_workers=0,
                  gradient_checkpointing=False,  # TRL's default is on; ours trains without it
                  model_init_kwargs={"dtype": torch.float32})  # the reference, loaded by the trainer
    dataset = Dataset.from_dict({"prompt": prompts})
    if kind == "grpo":
        trainer = GRPOTrainer(model=model, reward_funcs=reward, processing_class=tokenizer, train_dataset=dataset,
                              args=GRPOConfig(**common, loss_type="grpo", scale_rewards="group", epsilon=0.2))
    else:
        trainer = RLOOTrainer(model=model, reward_funcs=reward, processing_class=tokenizer, train_dataset=dataset,
                              args=RLOOConfig(**common))
    trainer.train()
    out = work / "trl-model"
    trainer.model.save_pretrained(out)  # as our train stage saves its policy
    tokenizer.save_pretrained(out)
    wall = time.perf_counter() - T_START
    rest = wall - timers["sampling_s"] - timers["scoring_s"]
    return {"wall_s": wall, **timers, "rest_s": rest, "tokens_per_s": timers["tokens"] / timers["sampling_s"],
            "peak_rss_gb": peak_rss_gb(), "model": str(out), "steps": steps}


def child_eval(model: str, prompts: list[str]) -> dict:
    import logging

    from stages.annotators.reward_model import RewardModel
    from stages.config import SampleConfig, annotator_step
    from stages.pipeline.refs import ArtifactRef
    from stages.services.generation import generate_hf
    from stages.services.models import resolve_model
    from stages.services.sample_metrics import bootstrap_ci

    path = resolve_model(model) if model == "smollm2" else model
    cfg = SampleConfig(n=1, max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K, batch_size=64,
                       dtype="float32")
    samples = [g[0] for g in generate_hf(path, prompts, cfg, 12345, logging.getLogger("bench"))]
    scorer = RewardModel(annotator_step(kind="reward_model", model=ArtifactRef(
        experiment="reward_movies", stage="train", file="model")))
    scores = scorer(prompts, [s["completion"] for s in samples])["score"]
    low, high = bootstrap_ci(scores, 0)
    return {"mean_reward": statistics.fmean(scores), "ci_low": low, "ci_high": high, "prompts": len(prompts)}


def prompts_of_the_flow(work: Path, train_prompts: int, heldout: int) -> dict:
    """The openings our flow trains on (the first P of the train split) and the held-out ones."""
    from stages.config import load_config
    from stages.pipeline.runner import run_stage
    from stages.pipeline.store import ArtifactStore

    path = work / "prompts.yaml"
    path.write_text(flow_config("grpo", train_prompts, 1))
    cfg = load_config(path)
    store = ArtifactStore(str(work / "prompts"))
    result = run_stage(cfg, "load_prompts", 0, store)
    rows = store.read_table(result.path).to_pylist()
    return {"train": [r["prompt"] for r in rows if r["split"] == "train"][:train_prompts],
            "heldout": [r["prompt"] for r in rows if r["split"] == "heldout"][:heldout]}


def folder_name(config: str) -> str:
    """A configuration's work folder: a variant's overrides (`+key=value,...`) made path-safe."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", config)


def run_child(args: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)
    if proc.returncode:
        sys.exit(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(args: list[str]) -> None:
    name, prompts_file, rounds, work = args[0], Path(args[1]), int(args[2]), Path(args[3])
    prompts = json.loads(prompts_file.read_text())
    if name == "eval":
        out = child_eval(args[4], prompts["heldout"])
    elif name.startswith("ours_"):
        base, _, variant = name.partition("+")
        out = child_ours({"ours_grpo": "grpo", "ours_rloo": "rl"}[base], len(prompts["train"]), rounds, work,
                         variant.split(",") if variant else [])
    else:
        out = child_trl(name.removeprefix("trl_"), prompts["train"], rounds, work)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32, help="training openings per round (x 4 samples)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds for the held-out comparison (0: skip it)")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 8 prompts, 1 round, 32 held out")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/online.json (online_bf16.json)")
    ap.add_argument("--precision", choices=["no", "bf16"], default="no",
                    help="training precision on both sides (no: float32; bf16: ours mixed_precision bf16, TRL bf16=True)")
    ap.add_argument("--generation-batch", type=int, default=32,
                    help="sequences per generate call on both sides (TRL: generation_batch_size, so also how many "
                         "samples each of its generations serves: P x 4 makes its round sample once, as ours does)")
    ap.add_argument("--micro-prompts", type=int, choices=[1, 2, 4], default=2,
                    help="prompts (x 4 sequences) per micro-batch on both sides; a step is 4 prompts (default 2: "
                         "2 micro-batches a step)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)} to run (default: all)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="also run each selected ours_* configuration with these --set overrides, as its own "
                         "configuration alternating with the others (repeatable); e.g. reference.batch_size=32")
    ap.add_argument("--child", nargs="+")
    a = ap.parse_args()
    if a.child:
        child_main(a.child)
        return
    if a.quick:
        a.repeats, a.prompts, a.rounds, a.heldout = 1, 8, 1, 32
    configs = a.configs.split(",")
    if unknown := sorted(set(configs) - set(CONFIGS)):
        sys.exit(f"--configs: unknown configuration(s) {', '.join(unknown)} (choose from {', '.join(CONFIGS)})")
    configs += [f"{c}+{v}" for v in a.variant for c in configs if c.startswith("ours_")]
    a.out = a.out or ROOT / "benchmarks" / "results" / ("online" + ("_bf16" if a.precision == "bf16" else "") +
                                                         ("_quick" if a.quick else "") +
                                                         (f"_gen{a.generation_batch}" if a.generation_batch != 32 else "") +
                                                         (f"_micro{a.micro_prompts}" if a.micro_prompts != 2 else "") +
                                                         ("_variants" if a.variant else "") + ".json")
    if not (ROOT / "artifacts" / "reward_movies").exists():
        sys.exit("run reward_movies.yaml first: `align run configs/reward_movies.yaml` (its reward model scores the samples)")
    env = dict(os.environ)
    from stages.training.allocator import jemalloc_library, preload_env

    if jemalloc_library():
        env = preload_env(env, jemalloc_library())
    env["ALIGN_MALLOC"] = "system"  # already preloaded: no re-exec
    env["BENCH_ONLINE_PRECISION"] = a.precision
    env["BENCH_ONLINE_GENERATION_BATCH"] = str(a.generation_batch)
    env["BENCH_ONLINE_MICRO_PROMPTS"] = str(a.micro_prompts)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        tmp = Path(tmp)
        prompts_file = tmp / "prompts.json"
        prompts_file.write_text(json.dumps(prompts_of_the_flow(tmp, a.prompts, a.heldout)))
        load = os.getloadavg()
        for r in range(a.repeats):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for name in order:
                work = tmp / f"{folder_name(name)}-{r}"
                work.mkdir()
                row = run_child([name, str(prompts_file), "1", str(work)], env)
                results[name].append(row)
                print(f"repeat {r + 1}: {name}: {json.dumps({k: v for k, v in row.items() if k != 'model'})}",
                      file=sys.stderr)
        quality: dict[str, dict] = {}
        if a.rounds:
            quality["base"] = run_child(["eval", str(prompts_file), "0", str(tmp), "smollm2"], env)
            for name in configs:
                work = tmp / f"{folder_name(name)}-quality"
                work.mkdir()
                trained = run_child([name, str(prompts_file), str(a.rounds), str(work)], env)
                quality[name] = {**run_child(["eval", str(prompts_file), "0", str(tmp), trained["model"]], env),
                                 "train_wall_s": trained["wall_s"]}
                print(f"quality: {name}: {quality[name]}", file=sys.stderr)
        load_after = os.getloadavg()
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    lines = ["| configuration | round wall | sampling | scoring | rest (reference + train) | tokens/s sampled "
             "| peak RSS | wall vs TRL | RSS vs TRL |", "|---|---|---|---|---|---|---|---|---|"]
    for name in configs:
        rows = results[name]
        other = results.get("trl_" + name.split("+")[0].split("_")[1])
        ratio = (f"{med(rows, 'wall_s') / med(other, 'wall_s'):.2f}x", f"{med(rows, 'peak_rss_gb') / med(other, 'peak_rss_gb'):.2f}x") \
            if name.startswith("ours") and other else ("", "")
        runs = ", ".join(f"{x['wall_s']:.1f}" for x in rows)
        lines.append(f"| {name} | {med(rows, 'wall_s'):.1f} s ({runs}) "
                     f"| {med(rows, 'sampling_s'):.1f} s | {med(rows, 'scoring_s'):.1f} s | {med(rows, 'rest_s'):.1f} s "
                     f"| {med(rows, 'tokens_per_s'):.0f} | {med(rows, 'peak_rss_gb'):.2f} GB | {ratio[0]} | {ratio[1]} |")
    if quality:
        lines += ["", f"| policy after {a.rounds} x {a.prompts} x {N} samples | held-out reward [95% CI] "
                      f"({a.heldout} openings) | training wall |", "|---|---|---|"]
        for name, q in quality.items():
            wall = f"{q['train_wall_s']:.0f} s" if "train_wall_s" in q else ""
            lines.append(f"| {name} | {q['mean_reward']:.3f} [{q['ci_low']:.3f}, {q['ci_high']:.3f}] | {wall} |")
    table = "\n".join(lines)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_dpo import commit, machine

    a.out.write_text(json.dumps({"machine": machine(), "commit": commit(), "cores": os.cpu_count(),
                                 "load_before": load, "load_after": load_after, "repeats": a.repeats,
                                 "precision": a.precision, "generation_batch": a.generation_batch,
                                 "variants": a.variant, "micro_prompts": a.micro_prompts,
                                 "prompts": a.prompts, "rounds": a.rounds, "results": results, "quality": quality,
                                 "table": table}, indent=2))
    print(table)
    print(f"load average before / after: {load[0]:.2f} / {load_after[0]:.2f}")


if __name__ == "__main__":
    main()
