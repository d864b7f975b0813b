"""Quark / NLF recipes side by side: round 0 of configs/quark_movies.yaml (or nlf_movies.yaml) under
each variant's overrides, on 100 held-out openings x 2, and what evaluate measured: the paired
gain over the base, the held-out conditioning probe (does log p(y | best) - log p(y | worst) favour
the better of two base samples of an unseen prompt), the match on the samples it trained on, the
sampled control ladder's spread (best minus worst control), the KL and the wall time.

All variants of a method run as one experiment (`abl_<method>`) under one artifact root, by
`align run --no-prefect` in its own process, one after the other: a stage whose inputs and config
are unchanged is reused (a variant that changes only training reuses the samples of the one
before it, when it sampled alike), the others are redone in place, so the experiment's artifacts
are the last variant's; each variant's numbers are kept in --out. Run reward_movies.yaml into the
same root first.

    .venv/bin/python benchmarks/conditioning_ablation.py quark base many_samples ... [--out FILE]
    .venv/bin/python benchmarks/conditioning_ablation.py quark --recipe NAME --budgets 300,800,1600,3200
    .venv/bin/python benchmarks/conditioning_ablation.py --list
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_dpo  # noqa: E402  (machine facts)

CONFIGS = {"quark": ROOT / "configs" / "quark_movies.yaml", "nlf": ROOT / "configs" / "nlf_movies.yaml"}
COMMON = ["rounds=1", "evaluate.max_prompts=100"]
# 1,600 samples: 16 of each of 100 openings, ranked against each other.
MANY = ["sample.n=16", "sample.max_prompts=100", "sample.batch_size=64"]
VARIANTS = {
    "shipped": [],
    "many_per_prompt": [*MANY, "build_pool.quantile_scope=per_prompt", "train.max_steps=400",
                        "train.learning_rate=1e-4"],
    "many_global": [*MANY, "build_pool.quantile_scope=global", "train.max_steps=400", "train.learning_rate=1e-4"],
    "many_per_prompt_q3": [*MANY, "build_pool.quantile_scope=per_prompt", "build_pool.quantiles=3",
                           "train.max_steps=400", "train.learning_rate=1e-4"],
    "many_per_prompt_lora": [*MANY, "build_pool.quantile_scope=per_prompt", "train.max_steps=400",
                             "train.learning_rate=1e-3", "train.lora={r: 16, alpha: 32}"],
    # Prompt tuning of the controls: only their embeddings train (no drift, no memorising).
    "many_per_prompt_controls_only": [*MANY, "build_pool.quantile_scope=per_prompt", "train.max_steps=400",
                                      "train.quark.controls_only=true", "train.quark.control_learning_rate=5e-3"],
    # The body barely moves, the controls fast.
    "many_per_prompt_control_lr": [*MANY, "build_pool.quantile_scope=per_prompt", "train.max_steps=400",
                                   "train.learning_rate=1e-5", "train.quark.control_learning_rate=5e-3"],
    # No entropy bonus: on its own samples the NLL's expected gradient is zero but for what the
    # controls tell apart, so the bonus is the one systematic push away from the reference.
    "many_per_prompt_ent0": [*MANY, "build_pool.quantile_scope=per_prompt", "train.max_steps=400",
                             "train.learning_rate=1e-4", "train.quark.entropy_coef=0"],
    # GeDi's discriminative loss beside the NLL: each sample likelier under its own token than another's.
    "many_per_prompt_contrast": [*MANY, "build_pool.quantile_scope=per_prompt", "train.max_steps=400",
                                 "train.learning_rate=1e-4", "train.quark.kl_coef=0.2", "train.quark.contrast_coef=1.0"],
    # Each sample likelier under its own token than its partner's (a sample of the same opening
    # under another token), against that partner: what the held-out probe measures, trained.
    "many_per_prompt_pair": [*MANY, "build_pool.quantile_scope=per_prompt", "train.max_steps=400",
                             "train.learning_rate=1e-4", "train.quark.pair_contrast_coef=1.0"],
    "many_per_prompt_kl02": [*MANY, "build_pool.quantile_scope=per_prompt", "train.max_steps=400",
                             "train.learning_rate=1e-4", "train.quark.kl_coef=0.2"],
    "many_per_prompt_kl05": [*MANY, "build_pool.quantile_scope=per_prompt", "train.max_steps=400",
                             "train.learning_rate=1e-4", "train.quark.kl_coef=0.5"],
}
METRICS = ("reward_gain", "conditioning_pairwise", "conditioning_match", "control_spread", "kl_to_reference",
           "controllability")


def run(method: str, name: str, overrides: list[str], artifacts: str, log) -> dict:
    experiment = f"abl_{method}"
    # the options Quark and NLF share (kl_coef, entropy_coef, contrast_coef) go to the method's section
    overrides = [o.replace("train.quark.", f"train.{method}.") for o in overrides]
    sets = [a for o in [*COMMON, *overrides] for a in ("--set", o)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "run", str(CONFIGS[method]), "--no-prefect", "--artifacts",
                    artifacts, "--experiment", experiment, *sets], check=True, cwd=ROOT, stdout=log, stderr=log)
    base = Path(artifacts) / experiment / "round-0"
    metrics = json.loads((base / "evaluate" / "manifest.json").read_text())["metrics"]
    walls = {p.parent.name: json.loads(p.read_text()).get("wall_seconds") for p in base.glob("*/manifest.json")}
    keep = {k: v for k, v in metrics.items() if any(k.startswith(m) for m in METRICS) or k.startswith("reward_with_control")}
    return {"method": method, "variant": name, "command": command(method, overrides), "commit": bench_dpo.commit(),
            "metrics": keep, "stage_seconds": walls, "process_seconds": round(time.perf_counter() - t0, 1)}


def command(method: str, overrides: list[str]) -> str:
    return " ".join(["align run", f"configs/{CONFIGS[method].name}", *(f"--set '{o}'" for o in [*COMMON, *overrides])])


def fmt(m: dict, name: str) -> str:
    v = m.get(name)
    if v is None:
        return "-"
    sign = "+" if name in ("reward_gain", "control_spread") else ""  # differences carry their sign
    lo, hi = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
    return f"{v:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]" if lo is not None else f"{v:{sign}.3f}"


def table(results: list[dict]) -> str:
    head = ("| method | variant | gain over base | held-out probe | match (trained on) | ladder spread | KL | round s |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        m = r["metrics"]
        lines.append(f"| {r['method']} | {r['variant']} | {fmt(m, 'reward_gain')} | {fmt(m, 'conditioning_pairwise')} "
                     f"| {fmt(m, 'conditioning_match')} | {fmt(m, 'control_spread')} | {fmt(m, 'kl_to_reference')} "
                     f"| {sum(v or 0 for v in r['stage_seconds'].values()):.0f} |")
    return "\n".join(lines)


def page(results: list[dict], record: dict) -> str:
    m = record["machine"]
    commands = "\n".join(f"- {r['method']} {r['variant']} (commit {r.get('commit') or 'not recorded'}): `{r['command']}`"
                         for r in results)
    return f"""# Quark and NLF recipes: round 0 side by side

Generated by `benchmarks/conditioning_ablation.py` from `benchmarks/results/conditioning_ablation.json`
(on {m['cpu']}, {m['cores']} cores, torch {m['torch']}; each run's commit is beside its command); do not edit by hand.

Round 0 of `configs/quark_movies.yaml` / `nlf_movies.yaml`, evaluated on 100 held-out openings x 2.
Columns: the paired **gain** of the policy's samples over the base's (same openings and seeds); the
**held-out probe**, the share of pairs of base samples of an unseen opening (rewards at least 0.2
apart) for which log p(y | best control) - log p(y | worst control) favours the better one (chance
0.5); the **match** on samples it trained on, the share whose own control is their likeliest (chance
about 1 / quantiles); the sampled **ladder spread**, reward with the best control minus the worst
(40 openings); the **KL** to the reference of the best-control samples; the round's wall time, its
stages' sum (sampling, scoring, training and evaluating). Intervals are bootstrap 95%. Unless its
name says `@N` (N samples a round, N / 100 of each of 100 openings, one epoch), a variant samples
1,600 (16 of each of 100 openings); its `train.max_steps=400` is capped at 200 steps by the one
epoch of `train.epochs: 1`. The reading of this table: [Quark and NLF: what the conditioning
learns](quark-nlf.md).

**Caveat.** The probe and match columns of the Quark runs below were made before commit bc1da44
and normalised Quark's log-probs over the control tokens too (a bug in `score(vocab=...)`, fixed
there): their values may differ from today's probe. Gains, spreads and KLs are unaffected, and
NLF's probe never used that argument.

{table(results)}

Commands:

{commands}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", nargs="?", choices=sorted(CONFIGS))
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "conditioning_ablation.json"))
    ap.add_argument("--page", default=str(ROOT / "docs" / "conditioning-ablation.md"),
                    help="the generated markdown page of every run in --out")
    ap.add_argument("--log", default="/tmp/conditioning_ablation.log")
    ap.add_argument("--list", action="store_true", help="print the variants and their overrides")
    ap.add_argument("--page-only", action="store_true", help="regenerate --page from --out and stop")
    ap.add_argument("--recipe", default="many_per_prompt", help="the variant --budgets varies")
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[],
                    help="samples per round to run --recipe at (100 openings, n = budget / 100 each), e.g. 300,800,1600")
    args = ap.parse_args()
    if args.page_only:
        record = json.loads(Path(args.out).read_text())
        Path(args.page).write_text(page(record["runs"], record))
        return
    if args.list or not args.method:
        for name, overrides in VARIANTS.items():
            print(f"{name}: {' '.join(overrides) or '(the shipped config)'}")
        return
    for budget in args.budgets:  # the recipe at another number of samples a round: one epoch over them
        VARIANTS[f"{args.recipe}@{budget}"] = [
            *[o for o in VARIANTS[args.recipe] if not o.startswith(("sample.n=", "sample.max_prompts=", "train.max_steps="))],
            f"sample.n={max(1, budget // 100)}", "sample.max_prompts=100", f"train.max_steps={max(1, budget // 8)}"]
        args.variants.append(f"{args.recipe}@{budget}")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r} (see --list)")
    out = Path(args.out)
    results = json.loads(out.read_text())["runs"] if out.exists() else []
    with open(args.log, "a") as log:
        for name in args.variants or list(VARIANTS):
            r = run(args.method, name, VARIANTS[name], args.artifacts, log)
            results = [x for x in results if (x["method"], x["variant"]) != (args.method, name)] + [r]
            out.write_text(json.dumps({"machine": bench_dpo.machine(), "commit": bench_dpo.commit(),
                                       "runs": results}, indent=1))
            print(table([r]).splitlines()[-1], flush=True)
            Path(args.page).write_text(page(results, json.loads(out.read_text())))
    print(table(results))


if __name__ == "__main__":
    main()
