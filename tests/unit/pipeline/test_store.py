import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.pipeline.store import ArtifactStore


def make_artifact(store: ArtifactStore, dest: str, value: int = 1) -> dict:
    work = store.new_workdir()
    pq.write_table(pa.table({"x": [value, value + 1]}), work / "data.parquet")
    (work / "model").mkdir()
    (work / "model" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    manifest = {"stage": "s", "fingerprint": "f", "run_id": "r", "rows": 2}
    store.commit(work, dest, manifest)
    return store.read_manifest(dest)


@pytest.mark.parametrize("root", ["local", "memory://align-test"])
def test_commit_verify_and_corruption(tmp_path, root):
    store = ArtifactStore(str(tmp_path / "root") if root == "local" else root)
    dest = store.stage_dir("exp", 0, "s")
    m = make_artifact(store, dest)
    assert set(m["files"]) == {"data.parquet", "model/weights.bin"}
    assert store.verify(dest, m) is None
    assert store.read_table(dest).column("x").to_pylist() == [1, 2]
    assert store.rounds("exp") == [0] and store.stages_in_round("exp", 0) == ["s"]

    with store.fs.open(f"{dest}/model/weights.bin", "wb") as f:
        f.write(b"\x00\x02" * 100)
    assert store.verify(dest, m) == "model/weights.bin checksum differs"
    store.fs.rm(f"{dest}/data.parquet")
    assert store.verify(dest, m) == "data.parquet is missing"
    if root != "local":
        store.fs.rm(store.root, recursive=True)


def test_manifest_is_written_last_and_readable_without_project_code(tmp_path):
    store = ArtifactStore(str(tmp_path))
    dest = store.stage_dir("exp", 0, "s")
    make_artifact(store, dest)
    manifest = json.loads((Path(dest) / "manifest.json").read_text())
    assert "manifest.json" not in manifest["files"]
    assert pq.read_table(Path(dest) / "data.parquet").num_rows == 2
    assert not (tmp_path / ".tmp").exists(), "scratch space is tidied after a commit"


def test_replacing_an_artifact_and_discarding_a_failed_one(tmp_path):
    store = ArtifactStore(str(tmp_path))
    dest = store.stage_dir("exp", 0, "s")
    make_artifact(store, dest, 1)
    make_artifact(store, dest, 10)
    assert store.read_table(dest).column("x").to_pylist() == [10, 11]
    work = store.new_workdir()
    (work / "half.parquet").write_bytes(b"partial")
    store.discard(work)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_missing_or_broken_manifest_reads_as_incomplete(tmp_path):
    store = ArtifactStore(str(tmp_path))
    (tmp_path / "a").mkdir()
    assert store.read_manifest(str(tmp_path / "a")) is None
    (tmp_path / "a" / "manifest.json").write_text("{not json")
    assert store.read_manifest(str(tmp_path / "a")) is None


@pytest.mark.parametrize("text", ["[]", "{}", "3", '"x"', "null", '{"rows": 1}', '{"fingerprint": "f", "run_id": "r", "rows": 1, "files": []}'])
def test_a_manifest_that_is_not_one_of_ours_reads_as_incomplete(tmp_path, text):
    store = ArtifactStore(str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(text)
    assert store.read_manifest(str(tmp_path / "a")) is None


class KilledUpload(BaseException):
    """Stands for a SIGKILL: nothing after it runs, not even `except Exception` handlers."""


def test_a_killed_upload_to_an_object_store_leaves_nothing_complete(monkeypatch):
    """Remote roots have no rename: the old manifest goes first and the new one last, so a kill
    after any file leaves an artifact that reads as incomplete (and never a mix that verifies)."""
    store = ArtifactStore("memory://align-kill")
    dest = store.stage_dir("exp", 0, "s")
    make_artifact(store, dest, 1)
    put = store.fs.put_file
    for fail_at in range(3):  # data.parquet, model/weights.bin, manifest.json (sorted upload order)
        uploads = []

        def dying_put(lpath, rpath, *a, **k):
            if len(uploads) == fail_at:
                raise KilledUpload(rpath)
            uploads.append(rpath)
            return put(lpath, rpath, *a, **k)

        monkeypatch.setattr(store.fs, "put_file", dying_put)
        with pytest.raises(KilledUpload):
            make_artifact(store, dest, 10)
        assert store.read_manifest(dest) is None, f"killed before upload {fail_at}: reads as incomplete"
        monkeypatch.setattr(store.fs, "put_file", put)
        make_artifact(store, dest, 1)  # a complete artifact again before the next kill
    m = make_artifact(store, dest, 10)
    assert store.verify(dest, m) is None and store.read_table(dest).column("x").to_pylist() == [10, 11]
    store.fs.rm(store.root, recursive=True)


def test_remote_artifacts_are_cached_by_run_id_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_ARTIFACT_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore("memory://align-cache")
    dest = store.stage_dir("exp", 0, "s")
    make_artifact(store, dest, 1)
    first = store.local_dir(dest)
    assert (first / "model" / "weights.bin").read_bytes() == b"\x00\x01" * 100
    assert store.local_dir(dest) == first  # cached
    work = store.new_workdir()
    pq.write_table(pa.table({"x": [5]}), work / "data.parquet")
    store.commit(work, dest, {"stage": "s", "fingerprint": "f", "run_id": "r2", "rows": 1})
    second = store.local_dir(dest)
    assert second != first and pq.read_table(second / "data.parquet").column("x").to_pylist() == [5]
    assert not (second / "model").exists()  # the old artifact's files are gone with it
    store.fs.rm(store.root, recursive=True)


def test_lineage_names_a_re_run_input_and_what_was_built_on_it(tmp_path):
    store = ArtifactStore(str(tmp_path))
    a, b, c = (store.stage_dir("exp", 0, s) for s in ("a", "b", "c"))

    def commit(dest, run_id, inputs):
        work = store.new_workdir()
        pq.write_table(pa.table({"x": [1]}), work / "data.parquet")
        store.commit(work, dest, {"fingerprint": "f", "run_id": run_id, "rows": 1,
                                  "inputs": {n: {"run_id": r, "path": p} for n, (p, r) in inputs.items()}})
        return store.read_manifest(dest)

    commit(a, "a1", {})
    mb = commit(b, "b1", {"a": (a, "a1")})
    mc = commit(c, "c1", {"b": (b, "b1")})
    assert store.lineage(mb) is None and store.lineage(mc) is None
    commit(a, "a2", {})  # a re-run (say, a failed run replaced it and stopped)
    assert store.lineage(mb) == "input a was re-run"
    assert store.lineage(mc) == "input a was re-run (under b)"
    store.fs.rm(a, recursive=True)
    assert store.lineage(mb) == "input a is incomplete"


def test_resume_folders_of_other_fingerprints_are_swept(tmp_path):
    store = ArtifactStore(str(tmp_path))
    keep = store.resume_dir("exp", 0, "train", "new")
    for fp in ("old1", "old2"):
        (store.resume_dir("exp", 0, "train", fp) / "checkpoint").mkdir(parents=True)
    other_stage = store.resume_dir("exp", 0, "reference", "x")
    other_exp = store.resume_dir("exp2", 0, "train", "y")
    other_stage.mkdir(parents=True)
    other_exp.mkdir(parents=True)
    swept = store.sweep_resume(keep)
    assert sorted(p.name for p in swept) == ["resume-exp-round-0-train-old1", "resume-exp-round-0-train-old2"]
    assert other_stage.exists() and other_exp.exists() and not any(p.exists() for p in swept)
