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
# Under pytest-xdist (`make test` runs two workers), each worker and the processes its tests start
# get their share of the cores: torch threads beyond the cores spin against each other and run far
# slower than half speed each.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session: SIGTERM to its group, SIGKILL after 30 s."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 30.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f}s")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1, and the environment a
    client needs to reach it: credentials and endpoint in the usual AWS variables, as users set them."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        env = {"AWS_ACCESS_KEY_ID": "align-test", "AWS_SECRET_ACCESS_KEY": "align-test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
        yield env
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_root(s3_server, monkeypatch, request):
    """A fresh bucket on the S3 server, its environment set in this process too: (url, env)."""
    import fsspec

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    import re

    bucket = "align-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:50].strip("-")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(bucket)
    fsspec.filesystem("s3").invalidate_cache()
    return f"s3://{bucket}/artifacts", s3_server
