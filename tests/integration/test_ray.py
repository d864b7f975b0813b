"""sample, annotate and reference spread over a Ray cluster: a head started with `ray start --head`
on 127.0.0.1 and a second node joining it, as on two machines. Each shard is a Ray task; the
manifest says where each ran; the same seed and shard count give the same rows run to run, and
one shard is exactly the unsharded result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, align, free_port, needs_prepared

pytestmark = needs_prepared

ONLINE = ROOT / "configs" / "smoke_online_dpo.yaml"
SHARDED = ["--set", "rounds=1", "--set", "stages=[load_prompts, sample, annotate, reweight, build_pool, reference]",
           "--set", "sample.shards=2", "--set", "annotate.shards=2", "--set", "reference.shards=2"]


def ray_cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    pytest.importorskip("ray")
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    head = ray_cli("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard",
                   "false", *common, env=env)
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        second = ray_cli("start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", *common, env=env)
        assert second.returncode == 0, second.stderr[-2000:]
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        ray_cli("stop", "--force", env=env)


def manifest(art: Path, stage: str) -> dict:
    return json.loads((art / "smoke_online_dpo" / "round-0" / stage / "manifest.json").read_text())


def table(art: Path, stage: str):
    return pq.read_table(art / "smoke_online_dpo" / "round-0" / stage / "data.parquet")


def test_stages_shard_over_two_ray_nodes_reproducibly(ray_cluster, tmp_path):
    first, second, single = tmp_path / "first", tmp_path / "second", tmp_path / "single"
    for art in (first, second):
        done = align("run", ONLINE, "--artifacts", art, "--no-prefect", *SHARDED, env=ray_cluster)
        assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("sample", "annotate", "reference"):
        places = manifest(first, stage)["metrics"]["shards_ran_on"]
        nodes = {p.rsplit("node ", 1)[-1] for p in places}
        assert len(places) == 2 and len(nodes) == 2, f"{stage}: both nodes ran a shard ({places})"
        assert table(first, stage).equals(table(second, stage)), f"{stage}: same seed and shards, same rows"

    # The same samples annotated and scored unsharded, in this process: the same numbers but for the
    # last float digits (other batches, other padding).
    done = align("run", ONLINE, "--artifacts", single, "--no-prefect", *SHARDED[:6], env=ray_cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    assert table(single, "sample").equals(table(first, "sample"))
    assert "shards_ran_on" not in manifest(single, "annotate")["metrics"]
    for stage, column in (("annotate", "score"), ("reference", "reference_logp1")):
        a, b = table(single, stage).column(column).to_pylist(), table(first, stage).column(column).to_pylist()
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4), stage
