"""Artifacts on S3-compatible object storage: a real S3 HTTP server (moto's server mode) on
127.0.0.1, s3fs as the client, credentials and endpoint from the usual AWS environment variables.

- An online flow runs end to end on `s3://bucket/prefix`: every artifact, the trained policy
  included, lives in the bucket; a second run finds them complete.
- A SIGKILL in the middle of an upload leaves an artifact that reads as incomplete, and the next
  run redoes exactly that stage.
"""

from __future__ import annotations

import os
import subprocess
import sys

import fsspec

from conftest import ROOT, SMOKE, align, needs_prepared
from stages.config import load_config
from stages.pipeline.store import ArtifactStore

pytestmark = needs_prepared

ONLINE = ROOT / "configs" / "smoke_online_dpo.yaml"


def complete_stages(url: str, experiment: str) -> dict[tuple[int, str], dict]:
    store = ArtifactStore(url)
    store.fs.invalidate_cache()
    found = {}
    for k in store.rounds(experiment):
        for stage in store.stages_in_round(experiment, k):
            path = store.stage_dir(experiment, k, stage)
            m = store.read_manifest(path)
            if m is not None and store.verify(path, m) is None:
                found[(k, stage)] = m
    return found


def test_an_online_flow_runs_end_to_end_on_s3(s3_root, tmp_path):
    url, env = s3_root
    env = {**env, "ALIGN_ARTIFACT_CACHE": str(tmp_path / "cache")}
    r = align("run", ONLINE, "--artifacts", url, "--no-prefect", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_config(ONLINE)
    done = complete_stages(url, "smoke_online_dpo")
    expected = {(k, s) for k in range(cfg.rounds) for s in cfg.stages if not (s == "load_prompts" and k)}
    assert set(done) == expected
    # The trained policy is in the bucket, checksummed in its manifest, and round 1 sampled from it.
    assert "model/config.json" in done[(0, "train")]["files"]
    fs = fsspec.filesystem("s3")
    assert fs.exists(url.removeprefix("s3://") + "/smoke_online_dpo/round-0/train/model/config.json")
    assert done[(1, "sample")]["inputs"]["train"]["run_id"] == done[(0, "train")]["run_id"]

    again = align("run", ONLINE, "--artifacts", url, "--no-prefect", env=env)
    assert again.returncode == 0 and "running (" not in again.stderr, again.stderr[-2000:]
    listed = align("inspect", f"{url}/smoke_online_dpo", env=env)
    assert listed.returncode == 0 and "incomplete" not in listed.stdout and "complete" in listed.stdout


KILL_IN_UPLOAD = """
import os, signal, sys
import s3fs

put, seen = s3fs.S3FileSystem._put_file, []

async def dying_put(self, lpath, rpath, *args, **kwargs):
    if "/round-0/train/" in rpath:
        seen.append(rpath)
        if len(seen) == 3:  # some of the new files are up, the manifest is not
            os.kill(os.getpid(), signal.SIGKILL)
    return await put(self, lpath, rpath, *args, **kwargs)

s3fs.S3FileSystem._put_file = dying_put
from flows.cli import main
sys.argv = ["align", *sys.argv[1:]]
main()
"""


def test_a_kill_in_the_middle_of_an_upload_leaves_nothing_that_looks_complete(s3_root, tmp_path):
    url, env = s3_root
    env = {**env, "ALIGN_ARTIFACT_CACHE": str(tmp_path / "cache")}
    first = align("run", SMOKE, "--artifacts", url, "--no-prefect", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    before = complete_stages(url, "smoke")
    # Change train's config so that train re-runs and replaces its complete artifact, and die in its upload.
    args = ["run", str(SMOKE), "--artifacts", url, "--no-prefect", "--set", "train.epochs=1"]
    # ALIGN_MALLOC=system: main() would re-exec the process under jemalloc and lose the patch.
    killed = subprocess.run([sys.executable, "-c", KILL_IN_UPLOAD, *args], cwd=ROOT,
                            env={**os.environ, **env, "ALIGN_MALLOC": "system"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    after = complete_stages(url, "smoke")
    assert (0, "train") not in after, "a half-uploaded train artifact must not read as complete"
    assert ArtifactStore(url).fs.ls(url.removeprefix("s3://") + "/smoke/round-0/train"), "the kill left part files"
    assert after[(0, "load_prompts")]["run_id"] == before[(0, "load_prompts")]["run_id"]
    listed = align("inspect", f"{url}/smoke", env=env)
    assert "incomplete" in listed.stdout

    resumed = align(*args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = complete_stages(url, "smoke")
    assert set(final) == set(before)
    assert final[(0, "build_pool")]["run_id"] == before[(0, "build_pool")]["run_id"]  # upstream untouched
    assert final[(0, "train")]["run_id"] != before[(0, "train")]["run_id"]


def test_a_skip_check_on_s3_trusts_the_etag_recorded_at_commit(s3_root, tmp_path, monkeypatch):
    """commit records each object's ETag; verify compares ETags (no download, no hashing) and still
    notices an object whose bytes changed, even at the same size."""
    import stages.pipeline.store as store_module

    url, _ = s3_root
    store = ArtifactStore(url)
    work = store.new_workdir()
    (work / "model").mkdir()
    (work / "model" / "weights.bin").write_bytes(b"a" * 4096)
    (work / "data.parquet").write_bytes(b"rows")
    dest = store.stage_dir("etag", 0, "train")
    store.commit(work, dest, {"fingerprint": "f", "run_id": "r", "rows": 1})
    manifest = store.read_manifest(dest)
    assert all(meta.get("etag") for meta in manifest["files"].values())

    def no_hashing(*_):
        raise AssertionError("verify downloaded and hashed a file whose ETag it had")

    monkeypatch.setattr(store_module, "sha256_file", no_hashing)
    assert store.verify(dest, manifest) is None
    with store.fs.open(f"{dest}/model/weights.bin", "wb") as f:  # same size, other bytes
        f.write(b"b" * 4096)
    store.fs.invalidate_cache()
    assert store.verify(dest, manifest) == "model/weights.bin checksum differs (its ETag changed)"
