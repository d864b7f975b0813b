"""One run per experiment at a time: a lock file in the artifact root, held through `filelock`.

    <root>/<experiment>/.lock       locked by the run that owns the experiment
    <root>/<experiment>/.lock.pid   its pid, for the message a second run gets

Every run takes it: `align run` (Prefect or --no-prefect), `align stage`, a deployment run from
the UI, a scheduled round; so two runs of one experiment never write the same artifacts at once.
The kernel drops the lock when the process ends, even on SIGKILL: a stale lock cannot block anyone.
Roots that are not local files (s3://...) lock a local file instead; that guards this machine only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from stages.pipeline.errors import BadInput
from stages.pipeline.store import ArtifactStore

log = logging.getLogger("align")


class ExperimentBusy(BadInput):
    """Another run holds the experiment (exit code 2, one line, like any refused input)."""


def lock_path(root: str, experiment: str) -> Path:
    store = ArtifactStore(root)
    if store.local:
        return Path(store.experiment_dir(experiment)) / ".lock"
    digest = hashlib.sha1(store.url.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "align-locks" / f"{digest}-{experiment}.lock"


def _pid_file(path: Path) -> Path:
    return path.with_name(path.name + ".pid")


def _holder(path: Path) -> str:
    try:
        pid = _pid_file(path).read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process"


@contextlib.contextmanager
def experiment_lock(root: str, experiment: str, wait: bool = False, poll_seconds: float = 2.0) -> Iterator[Path]:
    """Hold the experiment's lock for the block. Busy: wait (logging once) or raise ExperimentBusy."""
    path = lock_path(root, experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _holder(path)
        if not wait:
            raise ExperimentBusy(f"experiment {experiment} is already running ({holder}); "
                                 f"wait for it to finish or stop it (lock: {path})") from None
        log.info("experiment %s is already running (%s); waiting for it to finish", experiment, holder)
        lock.acquire(poll_interval=poll_seconds)
    try:
        _pid_file(path).write_text(f"{os.getpid()}\n")
        yield path
    finally:
        _pid_file(path).unlink(missing_ok=True)
        lock.release()
