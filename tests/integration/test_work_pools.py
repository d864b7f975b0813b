"""Stages on Prefect work pools: a real Prefect server, `align deploy` on two process pools, and two
`prefect worker start` workers on localhost, each in its own working directory with its own
Prefect home and artifact cache, sharing nothing but the S3 root (moto's S3 server). The config
places train and evaluate on the second pool; the flow runs on the first. One flow run shows the
placed stages as subflows, and every manifest says which host, worker and pool ran it.

The first run loses worker b (and every process it started) in the middle of train, as when its
machine dies: the heartbeat automation `align deploy` creates marks the silent subflow Crashed, the
run fails with a line naming the stage and pool, and the next run, on a restarted worker, ends
complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import psutil

from conftest import ROOT, align, free_port, needs_prepared, stop, wait_for_port

pytestmark = needs_prepared


def wait_until(predicate, timeout: float, what: str, procs=()):
    """Poll predicate until it is truthy. A poll the server does not answer in time counts as "not
    yet": on 2 cores busy with a worker's training, the SQLite-backed server once took over 10 s to
    answer a GET (clean-clone CI, 2026-12-02), and the run itself still completed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except httpx.TimeoutException:
            value = None
        if value:
            return value
        for p, log in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: a process exited ({p.returncode}): {log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def start(args, cwd, env, log):
    handle = open(log, "w")
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and everything it started (its flow runs too), all at once."""
    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(10)


def test_stages_run_on_the_workers_of_the_pools_the_config_names(s3_root, tmp_path):
    url, s3_env = s3_root
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base_env = {**os.environ, **s3_env, "PREFECT_API_URL": api}
    config = tmp_path / "pools.yaml"
    config.write_text(f"extends: {ROOT / 'configs' / 'smoke.yaml'}\nexperiment: smoke_pools\n"
                      "pools: {train: align-b, evaluate: align-b}\n")
    procs = []
    try:
        server_log = tmp_path / "server.log"
        server = start([sys.executable, "-m", "flows.cli", "server", "--port", str(port)], ROOT,
                       {**base_env, "PREFECT_HOME": str(tmp_path / "server-home")}, server_log)
        procs.append((server, server_log))
        wait_for_port(port, server, 180)
        wait_until(lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200 if _up(api) else False, 180,
                   "the Prefect server", procs)

        deployed = align("deploy", config, "--pool", "align-a", "--artifacts", url, env={"PREFECT_API_URL": api, **s3_env})
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        assert "align-stage/align-b" in deployed.stdout and "align-pipeline/smoke_pools" in deployed.stdout

        def worker(name, log_name="worker.log"):
            home = tmp_path / f"machine-{name}"
            home.mkdir(exist_ok=True)
            env = {**base_env, "PREFECT_HOME": str(home / "prefect"), "ALIGN_ARTIFACT_CACHE": str(home / "cache"),
                   "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
            log = home / log_name
            proc = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", f"align-{name}",
                          "--name", f"worker-{name}", "--type", "process"], home, env, log)
            procs.append((proc, log))
            return proc

        worker("a")
        worker_b = worker("b")

        def run_pipeline() -> str:
            ran = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "align-pipeline/smoke_pools"],
                                 env=base_env, capture_output=True, text=True, timeout=120)
            assert ran.returncode == 0, ran.stderr[-2000:]
            return next(line.split()[-1] for line in ran.stdout.splitlines() if "UUID" in line)

        def children(run_id):
            return httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
                "flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}).json()

        def finished(run_id):
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        # Run 1: worker b dies while train runs on it.
        first = run_pipeline()
        wait_until(lambda: any(c["name"].startswith("train") and c["state"]["type"] == "RUNNING"
                               for c in children(first)), 300, "train running on worker b", procs)
        time.sleep(3)
        kill_tree(worker_b)
        procs.remove(next(p for p in procs if p[0] is worker_b))
        state = wait_until(lambda: finished(first), 240, "the run that lost its worker", procs)
        assert state["type"] == "FAILED", state
        assert "train (round 0) on pool align-b: CRASHED" in (state["message"] or ""), state
        train = next(c for c in children(first) if c["name"].startswith("train"))
        assert train["state"]["type"] == "CRASHED" and "heartbeat" in train["state"]["message"], train["state"]

        # Run 2, on a restarted worker b: complete.
        worker("b", "worker-restarted.log")
        run_id = run_pipeline()
        state = wait_until(lambda: finished(run_id), 420, "the flow run", procs)
        logs = "\n".join(log.read_text()[-2000:] for _, log in procs[1:])
        assert state["type"] == "COMPLETED", f"{state}\n{logs}"

        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        bucket = url.removeprefix("s3://")
        placed = {}
        for stage in ("load_prompts", "build_pool", "train", "evaluate"):
            manifest = json.loads(fs.cat_file(f"{bucket}/smoke_pools/round-0/{stage}/manifest.json"))
            placed[stage] = (manifest["ran_on"]["worker"], manifest["ran_on"]["pool"])
        assert placed == {"load_prompts": ("worker-a", "align-a"), "build_pool": ("worker-a", "align-a"),
                          "train": ("worker-b", "align-b"), "evaluate": ("worker-b", "align-b")}

        # One flow run in the UI: the placed stages are its subflows.
        assert sorted(c["name"] for c in children(run_id)) == ["evaluate (round 0) on align-b", "train (round 0) on align-b"]
    finally:
        for proc, _ in reversed(procs):
            stop(proc)


def _up(api: str) -> bool:
    try:
        httpx.get(f"{api}/health", timeout=5)
        return True
    except httpx.HTTPError:
        return False
