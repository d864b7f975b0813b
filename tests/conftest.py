"""Shared test set-up: a private Prefect home and artifact root per session, and helpers.

Prefect reads its settings when first imported, so they are set here, before any test imports it.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SESSION = Path(tempfile.mkdtemp(prefix="align-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION / "prefect")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_SESSION / "prefect" / "storage")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMOKE = ROOT / "configs" / "smoke.yaml"


def align(*args, env=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run the `align` command as a user would, in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def artifacts(tmp_path) -> Path:
    return tmp_path / "artifacts"


def tiny_ready() -> bool:
    from stages.services.models import smollm2_dir

    return (smollm2_dir() / "config.json").exists()


def snippets_ready() -> bool:
    from stages.data.sources import corpus_path

    try:
        return corpus_path("movie_snippets").exists()
    except Exception:
        return False


needs_prepared = pytest.mark.skipif(not (tiny_ready() and snippets_ready()),
                                    reason="run `make setup` (align models prepare; align data prepare) first")
