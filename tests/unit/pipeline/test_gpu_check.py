"""benchmarks/gpu_check.sh on a machine without a GPU says so and succeeds (the check itself runs
where a GPU is lent; its results go to docs/benchmarks.md)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_the_gpu_check_says_there_is_no_gpu_and_exits_0(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "gpu_check: no CUDA GPU here; nothing to check"
    assert list(tmp_path.iterdir()) == []
