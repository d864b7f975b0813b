"""The train stage on two processes (torch.distributed through `accelerate launch`, gloo on CPU):
the same losses step by step as one process at the same global batch, only the stage's own
process commits, and a run killed mid-training resumes from its checkpoint to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, align, needs_prepared

pytestmark = needs_prepared

DPO = ROOT / "configs" / "smoke_dpo.yaml"
# 18 training pairs in batches of 17: each epoch one micro-batch split 9 + 8 across the processes
# and one of a single pair, where the second process computes a stand-in at weight 0.
# float32: the comparison is of the arithmetic itself; in bf16 a 9 + 8 split rounds differently from
# 17 rows in one batch (bf16 training and its resume: tests/unit/training/test_precision.py).
SETTINGS = ["--set", "train.batch_size=17", "--set", "train.checkpoint_every=1", "--set", "train.mixed_precision=no",
            "--set", "stages=[load_prompts, build_pool, reference, train]"]


def history(art: Path) -> list[dict]:
    path = art / "smoke_dpo" / "round-0" / "train" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(art: Path) -> dict[str, torch.Tensor]:
    return load_file(art / "smoke_dpo" / "round-0" / "train" / "model" / "model.safetensors")


def run(art: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    done = align("run", DPO, "--artifacts", art, "--no-prefect", "--set", f"train.processes={processes}", *SETTINGS, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_train_like_one_and_resume_after_a_kill(tmp_path):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    run(one, 1)
    launched = run(two, 2)
    assert "2 processes (MULTI_CPU)" in launched.stderr

    h1, h2 = history(one), history(two)
    assert len(h1) == len(h2) >= 4
    for a, b in zip(h1, h2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3, abs=1e-6)
        assert b["tokens"] == a["tokens"]  # every example counted once across the two processes
    w1, w2 = weights(one), weights(two)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    manifest = json.loads((two / "smoke_dpo" / "round-0" / "train" / "manifest.json").read_text())
    assert all(not f.startswith(".") and "rows.parquet" not in f for f in manifest["files"])

    # Killed (the whole process group, both training processes with it) after the first checkpoint.
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(DPO), "--artifacts", str(killed), "--no-prefect",
                             "--set", "train.processes=2", *SETTINGS], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(6000):
            if any(killed.glob(".tmp/resume-smoke_dpo-round-0-train-*/checkpoint/state.json")) or proc.poll() is not None:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "smoke_dpo" / "round-0" / "train" / "manifest.json").exists(), "killed before train finished"
    resumed = run(killed, 2)
    assert "train: resumed from checkpoint" in resumed.stderr
    assert [h["loss"] for h in history(killed)] == [h["loss"] for h in h2]
    w3 = weights(killed)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
