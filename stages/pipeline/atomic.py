"""Replace a folder by a complete new one so that a kill at any moment leaves a state the next
call finishes: the artifact store's commit, training checkpoints, the model cache and the corpora
all swap through here.

    dest            the current complete folder (or none yet)
    .<dest>.old     the previous one, only between the two renames or while it is being removed

At every instant `dest` is the old folder, the new folder, or missing with the old one kept beside
it; `recover(dest)` puts a kept old folder back (or drops it when the new one is in place). One
writer per destination at a time: callers hold the experiment lock or a build lock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock


def old_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def recover(dest: Path) -> None:
    """Finish a swap that a kill interrupted: no-op when none was."""
    dest = Path(dest)
    old = old_path(dest)
    if not _present(old):
        return
    if _present(dest):
        _remove(old)  # the new folder made it; the old one was being removed
    else:
        os.replace(old, dest)  # killed between the renames: the old folder is still the truth


def build_lock(dest: Path) -> FileLock:
    """A lock for building `dest` (a shared cache folder): kept in the temp folder, so the cache holds
    nothing but complete folders."""
    digest = hashlib.sha1(str(Path(dest).resolve()).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "align-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / f"build-{digest}.lock")


def swap_in(new: Path, dest: Path) -> None:
    """Move the complete folder `new` to `dest`, replacing whatever is there."""
    new, dest = Path(new), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    old = old_path(dest)
    if _present(dest):
        os.replace(dest, old)
    os.replace(new, dest)
    _remove(old)
