"""The artifact store: one folder per (experiment, round, stage), on any fsspec file system.

    <root>/<experiment>/round-<k>/<stage>/data.parquet   the stage's table
    <root>/<experiment>/round-<k>/<stage>/...            its files (a checkpoint, metrics.jsonl)
    <root>/<experiment>/round-<k>/<stage>/manifest.json  written last: the mark of completeness

A stage writes into a fresh local folder; `commit` moves it into place with one rename on local
roots. Object stores have no rename, so there `commit` first deletes the old manifest (the artifact
stops being complete), then the old files, uploads the new ones, and puts the manifest last in one
PUT; readers verify every file's checksum against it. A kill at any point leaves either no
manifest or a complete artifact. Artifacts on remote roots are read through a local cache keyed by
the manifest's run id, so a re-run artifact is fetched again. Nothing here is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from stages.pipeline.atomic import swap_in
from stages.pipeline.errors import BadInput

MANIFEST = "manifest.json"
DATA = "data.parquet"
REQUIRED_KEYS = ("fingerprint", "run_id", "rows", "files")
TMP = ".tmp"  # scratch folder under the root (same file system, so renames are atomic)


def artifact_cache_dir() -> Path:
    """Where artifacts of remote roots are cached on this machine (ALIGN_ARTIFACT_CACHE overrides)."""
    return Path(os.environ.get("ALIGN_ARTIFACT_CACHE") or Path(tempfile.gettempdir()) / "align-artifact-cache")


def etag(info: dict) -> str | None:
    """An object's ETag from fsspec's info (s3fs: "ETag", quoted; gcsfs/adlfs: "etag"), or None."""
    tag = info.get("ETag") or info.get("etag")
    return str(tag).strip('"') if tag else None


def sha256_file(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class ArtifactStore:
    def __init__(self, root: str):
        self.url = str(root)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:  # a known protocol whose package is missing (s3: s3fs)
            raise BadInput(f"artifact root {self.url}: {e}") from None
        except ValueError as e:
            raise BadInput(f"artifact root {self.url}: not a file system fsspec knows ({e})") from None
        self.local = self.fs.protocol in ("file", "local") or "file" in tuple(self.fs.protocol)

    def check_writable(self) -> None:
        """One line naming the root when a local root cannot hold artifacts (before anything runs)."""
        if not self.local:
            return
        path = Path(self.root)
        if path.exists() and not path.is_dir():
            raise BadInput(f"artifact root {path}: is a file, not a folder")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise BadInput(f"artifact root {path}: {existing} is not writable")
        try:  # os.access says yes to root everywhere; /proc, /sys or a read-only mount still refuse
            os.rmdir(tempfile.mkdtemp(prefix=".align-probe-", dir=existing))
        except OSError as e:
            raise BadInput(f"artifact root {path}: {existing} is not writable ({e.strerror})") from None

    # -- where things are -------------------------------------------------------------------------
    def experiment_dir(self, experiment: str) -> str:
        return f"{self.root.rstrip('/')}/{experiment}"

    def stage_dir(self, experiment: str, round_: int, stage: str) -> str:
        return f"{self.experiment_dir(experiment)}/round-{round_}/{stage}"

    def local_dir(self, path: str) -> Path:
        """A local folder with the artifact's files: itself on local roots, else a verified copy in
        a cache keyed by the artifact's path and run id (a re-run artifact is a new entry)."""
        if self.local:
            return Path(path)
        manifest = self.read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"no complete artifact at {self.fs.unstrip_protocol(path)}")
        key = hashlib.sha1(f"{self.fs.unstrip_protocol(path)}\0{manifest.get('run_id')}".encode()).hexdigest()[:20]
        cache = artifact_cache_dir() / key
        if (cache / MANIFEST).exists():
            return cache
        tmp = cache.with_name(f".{key}.{uuid.uuid4().hex[:6]}")
        try:
            for rel, meta in manifest.get("files", {}).items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{path}/{rel}", str(tmp / rel))
                if sha256_file(fsspec.filesystem("file"), str(tmp / rel)) != meta["sha256"]:
                    raise OSError(f"{self.fs.unstrip_protocol(path)}/{rel} changed while it was downloaded; run again")
            (tmp / MANIFEST).write_text(json.dumps(manifest))
            os.replace(tmp, cache)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (cache / MANIFEST).exists():
                raise
        return cache

    # -- reading ----------------------------------------------------------------------------------
    def read_manifest(self, path: str) -> dict | None:
        """The manifest, or None when there is none or it is not one of ours (not JSON, not an
        object, or missing the keys every commit writes): such an artifact reads as incomplete."""
        try:
            with self.fs.open(f"{path}/{MANIFEST}", "r") as f:
                manifest = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or \
                not all(k in manifest for k in REQUIRED_KEYS):
            return None
        return manifest

    def table_sha256(self, experiment: str, round_: int, stage: str) -> str | None:
        """The sha256 its manifest records for a stage's table (which exact table a reader read)."""
        manifest = self.read_manifest(self.stage_dir(experiment, round_, stage))
        return (manifest["files"].get(DATA) or {}).get("sha256") if manifest else None

    def lineage(self, manifest: dict, _seen: dict | None = None) -> str | None:
        """None when every input the artifact was built from, and theirs in turn, is still the
        complete artifact there (same run id); else the first that was re-run or is gone. The
        runner re-runs such a stage; `inspect` shows it as stale."""
        seen = {} if _seen is None else _seen
        for name, recorded in manifest.get("inputs", {}).items():
            path = recorded.get("path")
            if path not in seen:
                current = self.read_manifest(path) if path else None
                if current is None:
                    seen[path] = f"input {name} is incomplete"
                elif current.get("run_id") != recorded.get("run_id"):
                    seen[path] = f"input {name} was re-run"
                else:
                    seen[path] = None
                    upstream = self.lineage(current, seen)
                    seen[path] = upstream and f"{upstream} (under {name})"
            if seen[path]:
                return seen[path]
        return None

    def verify(self, path: str, manifest: dict) -> str | None:
        """None when every file listed in the manifest is there with its checksum; else what is wrong.
        On an object store a file whose ETag was recorded at commit is checked by that ETag (one
        request, the object store's own checksum of the bytes) instead of downloading and hashing
        it: a skip check no longer reads a 0.5 GB policy."""
        for rel, meta in manifest.get("files", {}).items():
            full = f"{path}/{rel}"
            try:
                info = self.fs.info(full)
            except FileNotFoundError:
                return f"{rel} is missing"
            if info.get("size") != meta["bytes"]:
                return f"{rel} changed size"
            if not self.local and meta.get("etag"):
                if etag(info) != meta["etag"]:
                    return f"{rel} checksum differs (its ETag changed)"
                continue
            if sha256_file(self.fs, full) != meta["sha256"]:
                return f"{rel} checksum differs"
        return None

    def read_table(self, path: str) -> pa.Table:
        with self.fs.open(f"{path}/{DATA}", "rb") as f:
            return pq.read_table(f)

    def rounds(self, experiment: str) -> list[int]:
        base = self.experiment_dir(experiment)
        if not self.fs.isdir(base):
            return []
        found = []
        for entry in self.fs.ls(base, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("round-") and name[6:].isdigit():
                found.append(int(name[6:]))
        return sorted(found)

    def stages_in_round(self, experiment: str, round_: int) -> list[str]:
        base = f"{self.experiment_dir(experiment)}/round-{round_}"
        if not self.fs.isdir(base):
            return []
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(base, detail=False) if self.fs.isdir(e))
        return sorted(n for n in names if not n.startswith("."))  # .<stage>.old: a swap in progress

    # -- writing ----------------------------------------------------------------------------------
    def new_workdir(self) -> Path:
        """A fresh local folder for a stage to write into."""
        if self.local:
            scratch = Path(self.root) / TMP
            scratch.mkdir(parents=True, exist_ok=True)
            self._sweep_orphans(scratch)
            path = scratch / f"work-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            path.mkdir()
            return path
        return Path(tempfile.mkdtemp(prefix="align-stage-"))

    def resume_dir(self, experiment: str, round_: int, stage: str, fp: str) -> Path:
        """Scratch that outlives a killed stage (training checkpoints), keyed by its fingerprint."""
        base = Path(self.root) / TMP if self.local else Path(tempfile.gettempdir()) / "align-resume"
        return base / f"resume-{experiment}-round-{round_}-{stage}-{fp}"  # created by whoever writes there

    def sweep_resume(self, keep: Path) -> list[Path]:
        """Remove the resume folders of the same experiment, round and stage under other
        fingerprints (a run killed before its config changed): they can never be resumed."""
        prefix = keep.name.rsplit("-", 1)[0] + "-"
        stale = [p for p in keep.parent.glob(f"{prefix}*") if p != keep and p.is_dir()] if keep.parent.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def drop_resume(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        self._tidy_scratch()

    @staticmethod
    def _sweep_orphans(scratch: Path) -> None:
        """Remove the half-written folders of processes that were killed mid-stage."""
        for path in scratch.glob("work-*"):
            try:
                os.kill(int(path.name.split("-")[1]), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except (ValueError, PermissionError, IndexError):
                pass

    def discard(self, workdir: Path) -> None:
        shutil.rmtree(workdir, ignore_errors=True)
        self._tidy_scratch()

    def _tidy_scratch(self) -> None:
        if self.local:
            try:
                (Path(self.root) / TMP).rmdir()  # only when empty
            except OSError:
                pass

    def commit(self, workdir: Path, dest: str, manifest: dict) -> None:
        """Checksum the files, write the manifest last, and move the folder into place."""
        files = {}
        for p in sorted(workdir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(workdir).as_posix()
                files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(fsspec.filesystem("file"), str(p))}
        manifest = {**manifest, "files": files}
        (workdir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str))
        if self.local:
            swap_in(workdir, Path(dest))
            self._tidy_scratch()
            return
        # Object stores: the old manifest goes first, the new one last (see the module's docstring).
        if self.fs.exists(f"{dest}/{MANIFEST}"):
            self.fs.rm_file(f"{dest}/{MANIFEST}")
        if self.fs.exists(dest):
            self.fs.rm(dest, recursive=True)
        for rel in files:
            self.fs.put_file(str(workdir / rel), f"{dest}/{rel}")
        self.fs.invalidate_cache(dest)
        for rel, meta in files.items():  # the store's checksum of what it holds, for cheap skip checks
            tag = etag(self.fs.info(f"{dest}/{rel}"))
            if tag:
                meta["etag"] = tag
        (workdir / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2, sort_keys=False, default=str))
        self.fs.put_file(str(workdir / MANIFEST), f"{dest}/{MANIFEST}")
        self.fs.invalidate_cache(dest)
        shutil.rmtree(workdir, ignore_errors=True)
