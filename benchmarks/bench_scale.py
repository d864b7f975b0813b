"""One online round three ways, wall time per stage: in one process; sample, annotate and reference
as two shards on a two-node Ray cluster (`ray start --head` and a second `ray start --address` on
this machine); train on two processes (DDP over gloo through `accelerate launch`).

The round is round 0 of configs/demo.yaml (online DPO, 64 openings x 2 samples, 100 held out; run
reward_movies.yaml into the same artifact root first). Each configuration is its own experiment
(scale_one, scale_ray, scale_ddp) under one root, run by `align run --no-prefect` in its own
process, one after the other; the walls come from the manifests. On a machine with 2 cores two
shards or two training processes share the same two cores: the table shows the cost of spreading
(model loads per worker, process start-up, gradient all-reduce), not a speed-up; on several
machines each shard or process gets its own.

    .venv/bin/python benchmarks/bench_scale.py [--artifacts artifacts] [--out benchmarks/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
STAGES = ["load_prompts", "sample", "annotate", "reweight", "build_pool", "reference", "train", "evaluate"]
RUNS = {
    "scale_one": [],
    "scale_ray": ["sample.shards=2", "annotate.shards=2", "reference.shards=2"],
    "scale_ddp": ["train.processes=2"],
}


def ray(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], check=True, capture_output=True,
                   env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(experiment: str, overrides: list[str], artifacts: str, env: dict) -> dict:
    sets = [a for o in ["rounds=1", *overrides] for a in ("--set", o)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "run", str(CONFIG), "--no-prefect", "--artifacts", artifacts,
                    "--experiment", experiment, *sets], check=True, cwd=ROOT, env=env)
    total = time.perf_counter() - t0
    base = Path(artifacts) / experiment / "round-0"
    walls = {s: json.loads((base / s / "manifest.json").read_text())["wall_seconds"] for s in STAGES}
    reward = json.loads((base / "evaluate" / "manifest.json").read_text())["metrics"]["mean_reward"]
    return {"walls": walls, "process_seconds": round(total, 1), "mean_reward": reward, "load": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = ap.parse_args()
    port = free_port()
    ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
        "--include-dashboard", "false", "--disable-usage-stats")
    try:
        ray("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
            "--disable-usage-stats")
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        results = {name: run(name, overrides, args.artifacts, env) for name, overrides in RUNS.items()}
    finally:
        ray("stop", "--force")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("| stage | " + " | ".join(RUNS) + " |")
    print("|---|" + "---|" * len(RUNS))
    for s in STAGES:
        print(f"| {s} | " + " | ".join(f"{results[n]['walls'][s]:.1f} s" for n in RUNS) + " |")
    print("| whole process | " + " | ".join(f"{results[n]['process_seconds']:.1f} s" for n in RUNS) + " |")
    print("| held-out reward | " + " | ".join(f"{results[n]['mean_reward']:.3f}" for n in RUNS) + " |")


if __name__ == "__main__":
    main()
