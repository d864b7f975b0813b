"""One run per experiment at a time: a lock file in the artifact root, held through `filelock`.

    <root>/<experiment>/.lock       locked by the run that owns the experiment
    <root>/<experiment>/.lock.pid   its pid, for the message a second run gets

Every run takes it: `align run` (Prefect or --no-prefect), `align stage`, a deployment run from
the UI, a scheduled round; so two runs of one experiment never write the same artifacts at once.
The kernel drops the lock when the process ends, even on SIGKILL: a stale lock cannot block anyone.

Roots on object storage (s3://..., any fsspec file system that can create a file exclusively) hold a
lease instead, since no kernel sees both machines:

    <root>/<experiment>/.lock       {"owner", "host", "pid", "expires"}: created only if absent

The holder rewrites `expires` every LEASE_SECONDS / 4; a lease past its expiry (its holder was
killed, or lost the store for that long), or one whose holder ran on this machine and is gone, is
broken by the next run, which logs whose it was. Lease
times are wall-clock: machines sharing a root need clocks within a few seconds of each other. Two
runs breaking one expired lease in the same instant can both go on (object stores delete
unconditionally); the one that lost it logs an error when it next renews.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from stages.pipeline.errors import BadInput
from stages.pipeline.store import ArtifactStore

log = logging.getLogger("align")


class ExperimentBusy(BadInput):
    """Another run holds the experiment (exit code 2, one line, like any refused input)."""


LEASE_SECONDS = 60.0


def lock_path(root: str, experiment: str) -> str:
    """Where the experiment's lock lives: a local file, or an object in the store."""
    store = ArtifactStore(root)
    return f"{store.experiment_dir(experiment)}/.lock"


def _pid_file(path: Path) -> Path:
    return path.with_name(path.name + ".pid")


def _holder(path: Path) -> str:
    try:
        pid = _pid_file(path).read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process"


def _busy(experiment: str, holder: str, where: str) -> ExperimentBusy:
    return ExperimentBusy(f"experiment {experiment} is already running ({holder}); "
                          f"wait for it to finish or stop it (lock: {where})")


@contextlib.contextmanager
def experiment_lock(root: str, experiment: str, wait: bool = False, poll_seconds: float = 2.0,
                    lease_seconds: float = LEASE_SECONDS) -> Iterator[str]:
    """Hold the experiment's lock for the block. Busy: wait (logging once) or raise ExperimentBusy."""
    store = ArtifactStore(root)
    if store.local:
        with _file_lock(Path(lock_path(root, experiment)), experiment, wait, poll_seconds) as path:
            yield str(path)
    else:
        with _lease(store, experiment, wait, poll_seconds, lease_seconds) as url:
            yield url


@contextlib.contextmanager
def _file_lock(path: Path, experiment: str, wait: bool, poll_seconds: float) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _holder(path)
        if not wait:
            raise _busy(experiment, holder, str(path)) from None
        log.info("experiment %s is already running (%s); waiting for it to finish", experiment, holder)
        lock.acquire(poll_interval=poll_seconds)
    try:
        _pid_file(path).write_text(f"{os.getpid()}\n")
        yield path
    finally:
        _pid_file(path).unlink(missing_ok=True)
        lock.release()


class _LeaseHolder:
    """One run's lease on an object-store lock: created exclusively, renewed by a thread."""

    def __init__(self, store: ArtifactStore, url: str, seconds: float):
        self.fs, self.url, self.seconds = store.fs, url, seconds
        self.owner = uuid.uuid4().hex
        self.stop = threading.Event()

    def body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.seconds}).encode()

    def read(self) -> dict | None:
        try:
            data = json.loads(self.fs.cat_file(self.url))
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}  # unreadable: treated as expired

    def try_create(self) -> bool:
        try:
            with self.fs.open(self.url, "xb") as f:
                f.write(self.body())
            return True
        except FileExistsError:
            return False

    def renew(self) -> None:
        while not self.stop.wait(self.seconds / 4):
            current = self.read()
            if not current or current.get("owner") != self.owner:
                log.error("the lease on %s was taken over by %s; this run no longer holds the experiment",
                          self.url, _describe(current))
                return
            self.fs.pipe_file(self.url, self.body())

    def release(self) -> None:
        self.stop.set()
        current = self.read()
        if current and current.get("owner") == self.owner:
            self.fs.rm_file(self.url)


def _gone(lease: dict) -> bool:
    """Whether the lease's holder ran on this machine and its process has ended (killed)."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _describe(lease: dict | None) -> str:
    if not lease:
        return "nobody"
    return f"pid {lease.get('pid', '?')} on {lease.get('host', '?')}"


@contextlib.contextmanager
def _lease(store: ArtifactStore, experiment: str, wait: bool, poll_seconds: float, seconds: float) -> Iterator[str]:
    url = lock_path(store.url, experiment)
    holder = _LeaseHolder(store, url, seconds)
    store.fs.makedirs(store.experiment_dir(experiment), exist_ok=True)
    logged = False
    while not holder.try_create():
        current = holder.read()
        if current is None:
            continue  # released between our attempt and the read
        gone = _gone(current)
        if gone or current.get("expires", 0) < time.time():
            log.warning("experiment %s: breaking the %s lease of %s (%s)", experiment,
                        "dead process's" if gone else "expired", _describe(current), url)
            store.fs.rm_file(url)
            continue
        if not wait:
            raise _busy(experiment, _describe(current), store.fs.unstrip_protocol(url))
        if not logged:
            log.info("experiment %s is already running (%s); waiting for it to finish", experiment, _describe(current))
            logged = True
        time.sleep(poll_seconds)
    thread = threading.Thread(target=holder.renew, name=f"lease-{experiment}", daemon=True)
    thread.start()
    try:
        yield store.fs.unstrip_protocol(url)
    finally:
        holder.release()
