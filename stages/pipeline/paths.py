"""Where things live on disk: the project root, the artifact root, the offline cache."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_artifact_root() -> str:
    return os.environ.get("ALIGN_ARTIFACTS", str(PROJECT_ROOT / "artifacts"))


def cache_dir() -> Path:
    """Prepared models and data (built once at set-up, never downloaded from a hub at run time)."""
    return Path(os.environ.get("ALIGN_CACHE", PROJECT_ROOT / "artifacts" / "_cache"))
