"""The `align` command as users run it: exit codes, one-line errors, nothing left behind,
skipping complete stages through Prefect, and surviving a SIGKILL mid-stage."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SMOKE, align, needs_prepared
from stages.config import load_config
from stages.pipeline.runner import run_flow_locally
from stages.pipeline.store import ArtifactStore


@needs_prepared
@pytest.mark.parametrize("command", [["run", SMOKE, "--no-prefect"], ["stage", "load_prompts", "--config", SMOKE]])
def test_runs_without_prefect_take_the_experiment_lock_too(tmp_path, command):
    from stages.pipeline.lock import experiment_lock

    with experiment_lock(str(tmp_path), "smoke"):
        proc = align(*command, "--artifacts", tmp_path)
    assert_one_line_error(proc, "experiment smoke is already running")
    assert not (tmp_path / "smoke" / "round-0").exists()


def assert_one_line_error(proc, expected):
    assert proc.returncode == 2, proc.stderr
    # Prefect's own run log may surround it (and says "Stopping temporary server" at exit).
    errors = [line for line in proc.stderr.splitlines() if line.startswith("align: error: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0], "the error is the last line"
    assert proc.stderr.count(errors[0].removeprefix("align: error: ")) == 1, "said once, not repeated by Prefect"


@pytest.mark.parametrize("yaml_text, sets, expected", [
    ("experiment: x\ntrain: [oops\n", [], "malformed YAML"),
    ("experiment: x\ntrain:\n  learning_rte: 1e-5\n", [], "unknown key 'train.learning_rte'"),
    ("experiment: x\ntrain:\n  epochs: two\n", [], "bad value for 'train.epochs'"),
    ("experiment: x\n", ["load_prompts.source=/no/such/data.jsonl"], "load_prompts.source: file not found: /no/such/data.jsonl"),
    ("experiment: x\n", ["train.model=/no/such/model"], "train.model: model path does not exist: /no/such/model"),
])
def test_bad_input_exits_2_with_one_line_and_no_artifacts(tmp_path, yaml_text, sets, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    args = [a for s in sets for a in ("--set", s)]
    proc = align("run", cfg, *args, "--artifacts", tmp_path / "artifacts")
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "artifacts").exists()


@needs_prepared
@pytest.mark.parametrize("case", ["missing_column", "empty"])
def test_bad_dataset_through_prefect(tmp_path, case):
    """Errors raised inside a stage (a Prefect task) keep their exit code and single line."""
    data = tmp_path / "prompts.jsonl"
    if case == "missing_column":
        data.write_text('{"text": "a prompt"}\n{"text": "another"}\n')
        expected = "missing required column 'prompt'"
    else:
        data.write_text("")
        expected = "is empty"
    proc = align("run", SMOKE, "--set", f"load_prompts.source={data}", "--artifacts", tmp_path / "artifacts")
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("manifest.json"))


def test_unknown_stage_and_missing_inputs(tmp_path):
    proc = align("stage", "train", "--config", SMOKE, "--artifacts", tmp_path / "a")
    assert_one_line_error(proc, "stage train needs build_pool (round 0)")
    proc = align("stage", "sample", "--config", SMOKE, "--artifacts", tmp_path / "a")
    assert_one_line_error(proc, "stage 'sample' is not part of")


@needs_prepared
def test_run_twice_then_inspect(tmp_path):
    art = tmp_path / "artifacts"
    t0 = time.perf_counter()
    first = align("run", SMOKE, "--artifacts", art)
    t1 = time.perf_counter()
    assert first.returncode == 0, first.stderr
    second = align("run", SMOKE, "--artifacts", art)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("skipped") >= 4 and " ran " not in second.stdout
    assert "skipped, complete artifact" in second.stderr
    shown = align("inspect", art / "smoke")
    assert shown.returncode == 0 and shown.stdout.count("complete") >= 4
    print(f"first run {t1 - t0:.1f}s")


def _wait_for(predicate, timeout, proc):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@needs_prepared
def test_sigkill_mid_training_then_rerun_matches_uninterrupted(tmp_path):
    art = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(SMOKE), "--artifacts", str(art)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint = lambda: any(art.glob(".tmp/resume-smoke-round-0-train-*/checkpoint/state.json"))  # noqa: E731
    try:
        assert _wait_for(checkpoint, 300, proc), "training never wrote a checkpoint"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (art / "smoke" / "round-0" / "train" / "manifest.json").exists(), "killed before train finished"

    again = align("run", SMOKE, "--artifacts", art)
    assert again.returncode == 0, again.stderr
    assert "train: resumed from checkpoint" in again.stderr
    assert "was left running by a killed process; marked Crashed" in again.stderr  # the killed run, in Prefect's database
    lines = {line.split()[3]: line for line in again.stdout.splitlines() if line.startswith("│")}
    assert "skipped" in lines["load_prompts"] and "skipped" in lines["build_pool"]
    assert " ran " in lines["train"] and " ran " in lines["evaluate"]
    assert not (art / ".tmp").exists(), "scratch and resume folders are cleaned up"

    clean = tmp_path / "clean"
    run_flow_locally(load_config(SMOKE), ArtifactStore(str(clean)))
    for stage in ("load_prompts", "build_pool", "train", "evaluate"):
        a = json.loads((art / "smoke/round-0" / stage / "manifest.json").read_text())
        b = json.loads((clean / "smoke/round-0" / stage / "manifest.json").read_text())
        assert a["fingerprint"] == b["fingerprint"]
    for stage in ("load_prompts", "build_pool"):
        assert (art / "smoke/round-0" / stage / "data.parquet").read_bytes() == \
            (clean / "smoke/round-0" / stage / "data.parquet").read_bytes()
    wa = load_file(art / "smoke/round-0/train/model/model.safetensors")
    wb = load_file(clean / "smoke/round-0/train/model/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    ea = json.loads((art / "smoke/round-0/evaluate/manifest.json").read_text())["metrics"]
    eb = json.loads((clean / "smoke/round-0/evaluate/manifest.json").read_text())["metrics"]
    assert abs(ea["heldout_nll"] - eb["heldout_nll"]) < 1e-4
