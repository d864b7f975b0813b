"""What every manifest records about the code and the machine that made its artifact: the git
commit of the checkout the code ran from (and whether its tracked files differed from it), the
versions of the packages that decide the numbers, the CPU, its thread count and the GPU. A result
then carries its own provenance wherever its manifest is copied (docs/results)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("align-workbench", "torch", "transformers", "accelerate", "peft", "datasets", "prefect")
CHECKOUT = Path(__file__).resolve().parents[2]


def git_state(root: Path = CHECKOUT) -> dict:
    """{commit, dirty} of the checkout at `root`; {} where it is not one (an installed package)."""
    if not (root / ".git").exists():
        return {}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(changed)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _machine_and_versions() -> dict:
    import torch

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"versions": versions, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": gpu}


# The checkout's state when this process imported the code: what it runs, even if the checkout
# moves under a long run (a commit, a pull); a worker's next run is a new process and asks again.
CODE_STATE = git_state()


def provenance() -> dict:
    """The manifest's `provenance`."""
    return {**CODE_STATE, **_machine_and_versions()}
