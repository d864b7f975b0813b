"""The reliability campaign: kill a two-round online flow at seeded random moments, corrupt its
artifacts, and check that nothing is lost.

1. A reference run of the flow (configs/smoke_online_dpo.yaml by default: 2 rounds, every online
   stage) records each stage's fingerprint and the sha256 of its table (of its weights, for train,
   whose table holds timings).
2. Kills: a fresh run is started (`align run --no-prefect` as its own process group) and SIGKILLed
   after a seeded random delay within the reference's wall time; then it is run again to the end.
   It must end with every stage complete (`inspect`), the reference's fingerprints and
   byte-identical tables.
3. Corruptions: one byte of a random artifact file is flipped; a re-run must find it (checksums),
   redo exactly that stage and what depends on it, and end byte-identical again.

    .venv/bin/python benchmarks/fault_campaign.py [--kills 20] [--corruptions 10] [--seed 0] [--s3]

--s3 runs the same against an S3 root (moto's server on 127.0.0.1). The test suite runs a short
version (tests/integration/test_faults.py); docs/reliability.md shows the long one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "smoke_online_dpo.yaml"


@dataclass
class Tally:
    kills: int = 0
    kills_survived: int = 0
    corruptions: int = 0
    corruptions_detected: int = 0
    problems: list[str] = field(default_factory=list)


def align(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, **kw)


def state(root: str, experiment: str) -> dict[tuple[int, str], tuple[str, str, str]]:
    """(round, stage) -> (fingerprint, sha256 of the table, run id) of every complete artifact."""
    from stages.pipeline.store import DATA, ArtifactStore

    store = ArtifactStore(root)
    store.fs.invalidate_cache()
    out = {}
    for k in store.rounds(experiment):
        for stage in store.stages_in_round(experiment, k):
            path = store.stage_dir(experiment, k, stage)
            m = store.read_manifest(path)
            if m is None or store.verify(path, m) or store.lineage(m):
                continue
            # train's table holds per-step timings; its weights are what must be identical.
            content = "model/model.safetensors" if stage == "train" else DATA
            out[(k, stage)] = (m["fingerprint"], m["files"][content]["sha256"], m["run_id"])
    return out


def run_flow(root: str, env: dict, config: Path = CONFIG) -> float:
    t0 = time.perf_counter()
    done = align(["run", str(config), "--no-prefect", "--artifacts", root], env)
    if done.returncode != 0:
        raise RuntimeError(f"run failed ({done.returncode}): {done.stderr[-1500:]}")
    return time.perf_counter() - t0


def same(reference: dict, now: dict) -> str | None:
    if set(now) != set(reference):
        return f"complete stages differ: missing {sorted(set(reference) - set(now))}"
    for key, (fp, sha, _) in reference.items():
        if now[key][:2] != (fp, sha):
            return f"{key}: {'fingerprint' if now[key][0] != fp else 'table'} differs"
    return None


def kill_trial(root: str, env: dict, delay: float, reference: dict, experiment: str) -> str | None:
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(CONFIG), "--no-prefect", "--artifacts", root],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    time.sleep(delay)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    run_flow(root, env)
    listed = align(["inspect", f"{root}/{experiment}"], env)
    if listed.returncode != 0 or "incomplete" in listed.stdout or "corrupt" in listed.stdout or "stale" in listed.stdout:
        return f"inspect after the re-run: {listed.stdout[-800:]}"
    return same(reference, state(root, experiment))


def corrupt_trial(root: str, env: dict, rng: random.Random, reference: dict, experiment: str) -> str | None:
    from stages.pipeline.store import ArtifactStore

    store = ArtifactStore(root)
    store.fs.invalidate_cache()
    # Files inside a stage's folder (round-k/<stage>/...), not the round's report beside them.
    files = sorted(p for p in store.fs.find(store.experiment_dir(experiment))
                   if not p.endswith("manifest.json") and "/round-" in p and p.split("/round-", 1)[1].count("/") >= 2)
    target = rng.choice(files)
    data = bytearray(store.fs.cat_file(target))
    if not data:
        return None
    i = rng.randrange(len(data))
    data[i] ^= 0xFF
    store.fs.pipe_file(target, bytes(data))
    stage_dir = target.split("/round-", 1)[1].split("/")
    hit = (int(stage_dir[0]), stage_dir[1])
    if hit in state(root, experiment):
        return f"{target}: a flipped byte went unnoticed"
    before = state(root, experiment)
    run_flow(root, env)
    after = state(root, experiment)
    rerun = {k for k in after if before.get(k, (None, None, None))[2] != after[k][2]}
    if hit not in rerun:
        return f"{target}: the damaged stage {hit} was not re-run"
    return same(reference, after)


def campaign(root: str, env: dict, kills: int, corruptions: int, seed: int, log=print) -> Tally:
    experiment = "smoke_online_dpo"
    rng = random.Random(seed)
    tally = Tally()
    # Every trial runs at the same root (tables record the checkpoint's path), emptied in between.
    from stages.pipeline.store import ArtifactStore

    store = ArtifactStore(root)

    def empty() -> None:
        if store.fs.exists(store.root):
            store.fs.rm(store.root, recursive=True)

    wall = run_flow(root, env)
    reference = state(root, experiment)
    log(f"reference run: {wall:.1f}s, {len(reference)} complete stages")
    for i in range(kills):
        empty()
        delay = rng.uniform(0.5, wall)
        tally.kills += 1
        problem = kill_trial(root, env, delay, reference, experiment)
        tally.kills_survived += problem is None
        if problem:
            tally.problems.append(f"kill {i} at {delay:.1f}s: {problem}")
        log(f"kill {i}: SIGKILL at {delay:.1f}s -> {'ok' if problem is None else problem}")
    for i in range(corruptions):
        tally.corruptions += 1
        problem = corrupt_trial(root, env, rng, reference, experiment)
        tally.corruptions_detected += problem is None
        if problem:
            tally.problems.append(f"corruption {i}: {problem}")
        log(f"corruption {i}: {'ok' if problem is None else problem}")
    return tally


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--corruptions", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--s3", action="store_true", help="run against an S3 root on a local moto server")
    args = ap.parse_args()
    env = {**os.environ, "ALIGN_MALLOC": os.environ.get("ALIGN_MALLOC", "jemalloc")}
    server = None
    if args.s3:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        env.update({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"})
        os.environ.update(env)
        import fsspec

        fsspec.filesystem("s3").mkdir("align-campaign")
        root = "s3://align-campaign/run"
    else:
        root = tempfile.mkdtemp(prefix="align-campaign-") + "/run"
    t0 = time.perf_counter()
    try:
        tally = campaign(root, env, args.kills, args.corruptions, args.seed)
    finally:
        if server:
            server.terminate()
    print(json.dumps({"root": "s3" if args.s3 else "local", "seed": args.seed, "minutes": round((time.perf_counter() - t0) / 60, 1),
                      **{k: v for k, v in tally.__dict__.items()}}, indent=2))
    print("| root | kills | survived | corruptions | detected and redone |")
    print("|---|---|---|---|---|")
    print(f"| {'S3 (moto)' if args.s3 else 'local'} | {tally.kills} | {tally.kills_survived} | {tally.corruptions} | "
          f"{tally.corruptions_detected} |")


if __name__ == "__main__":
    main()
