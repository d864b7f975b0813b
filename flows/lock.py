"""One run per experiment at a time: an advisory lock file in the artifact root.

    <root>/<experiment>/.lock     flock'ed by the run that owns the experiment; holds its pid

The lock is taken by every Prefect run of the pipeline (`align run`, a deployment run from the UI,
a scheduled round), so two runs of the same experiment never write the same artifacts at once.
The kernel drops it when the process ends, even on SIGKILL: a stale lock cannot block anyone.
Roots that are not local files (s3://...) lock a local file instead; that guards this machine only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

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


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process"


@contextlib.contextmanager
def experiment_lock(root: str, experiment: str, wait: bool = False, poll_seconds: float = 2.0) -> Iterator[Path]:
    """Hold the experiment's lock for the block. Busy: wait (logging once) or raise ExperimentBusy."""
    path = lock_path(root, experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(path)
                if not wait:
                    raise ExperimentBusy(f"experiment {experiment} is already running ({holder}); "
                                         f"wait for it to finish or stop it (lock: {path})") from None
                if not waited:
                    log.info("experiment %s is already running (%s); waiting for it to finish", experiment, holder)
                    waited = True
                time.sleep(poll_seconds)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
