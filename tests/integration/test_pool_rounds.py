"""Quark and NLF as rounds over the persistent data pool, on the tiny model: the conditioning per
round, the pool across rounds (earlier pools untouched), every quantile's token, the reference's
unconditioned view, and a round killed mid-way that resumes at its first incomplete stage."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, align, needs_prepared
from stages.config import load_config
from stages.data.pool import SAMPLES_FILE, with_samples
from stages.pipeline.runner import run_flow_locally
from stages.pipeline.store import ArtifactStore

pytestmark = needs_prepared

QUARK = ROOT / "configs" / "smoke_online_quark.yaml"
NLF = ROOT / "configs" / "smoke_online_nlf.yaml"


def rows(art, experiment, round_, stage):
    return pq.read_table(art / experiment / f"round-{round_}" / stage / "data.parquet").to_pylist()


def pooled(art, experiment, round_):
    """Round k's pool joined with the samples that the pools of rounds 0..k stored (as build_pool reads it)."""
    pool = pq.read_table(art / experiment / f"round-{round_}" / "data_pool" / "data.parquet")
    samples = pa.concat_tables(pq.read_table(art / experiment / f"round-{k}" / "data_pool" / SAMPLES_FILE)
                               for k in range(round_ + 1))
    return with_samples(pool, samples).to_pylist()


def manifest(art, experiment, round_, stage):
    path = art / experiment / f"round-{round_}" / stage / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_quark_rounds_over_the_pool_killed_mid_round_resume_where_they_stopped(tmp_path):
    art = tmp_path / "art"
    first = align("run", QUARK, "--no-prefect", "--artifacts", art, "--set", "rounds=1")
    assert first.returncode == 0, first.stderr
    pool0 = art / "smoke_online_quark/round-0/data_pool/data.parquet"
    pool0_sha = sha(pool0)

    # Round 1, killed (SIGKILL to the whole process group) while build_pool runs.
    env = {**os.environ, "ALIGN_INJECT_FAULT": "build_pool:hang"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(QUARK), "--no-prefect", "--artifacts",
                             str(art), "--set", "rounds=2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        end = time.monotonic() + 300
        while manifest(art, "smoke_online_quark", 1, "data_pool") is None and time.monotonic() < end:
            assert proc.poll() is None, "the run ended before it was killed"
            time.sleep(0.1)
        time.sleep(1.0)  # into build_pool's injected hang
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {s: manifest(art, "smoke_online_quark", 1, s) for s in ("sample", "annotate", "data_pool")}
    assert all(done.values()) and manifest(art, "smoke_online_quark", 1, "build_pool") is None

    again = align("run", QUARK, "--no-prefect", "--artifacts", art, "--set", "rounds=2")
    assert again.returncode == 0, again.stderr
    status = {(line.split()[1], line.split()[3]): line.split()[5] for line in again.stdout.splitlines()
              if line.startswith("│")}
    assert all(v == "skipped" for (k, _), v in status.items() if k == "0")
    assert [status[("1", s)] for s in ("sample", "annotate", "data_pool", "build_pool", "train", "evaluate")] == \
        ["skipped"] * 3 + ["ran"] * 3
    for s, m in done.items():  # the stages done before the kill were reused, not redone
        assert manifest(art, "smoke_online_quark", 1, s)["started"] == m["started"]

    # Round 0 sampled the base model unconditioned; round 1 samples with the best token.
    assert {r["conditioning"] for r in rows(art, "smoke_online_quark", 0, "sample")} == {None}
    assert {r["conditioning"] for r in rows(art, "smoke_online_quark", 1, "sample")} == {"<|quark_0|>"}
    # Round 1's pool is round 0's plus round 1's samples; round 0's pool file is untouched.
    assert sha(pool0) == pool0_sha
    pool1 = pooled(art, "smoke_online_quark", 1)
    assert len(pool1) == 2 * len(rows(art, "smoke_online_quark", 0, "data_pool"))
    assert {r["round"] for r in pool1} == {0, 1}
    assert all(r["checkpoint"].endswith("round-0/train/model") for r in pool1 if r["round"] == 1)
    drawn = [r for r in pool1 if r["drawn"]]
    records = rows(art, "smoke_online_quark", 1, "build_pool")
    assert len(records) == len(drawn)
    assert {r["control"] for r in records} == {f"<|quark_{r['quantile']}|>" for r in drawn}
    # The reference sees the unconditioned prompt: the records keep the sampled, unconditioned ids.
    sampled = {(r["prompt_id"], r["completion"]): r for r in rows(art, "smoke_online_quark", 1, "sample")}
    for rec in records:
        s = sampled.get((rec["prompt_id"], rec["generation1"]))
        if s is not None:
            assert rec["prompt_ids"] == s["prompt_ids"] and rec["generation1_ids"] == s["completion_ids"]
    # Every quantile's token was added before round 0's training, drawn or not.
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(art / "smoke_online_quark/round-0/train/model").get_vocab()
    assert all(f"<|quark_{k}|>" in vocab for k in range(5))
    # Evaluate reports what the papers do, with intervals, and the reward under each token.
    metrics = manifest(art, "smoke_online_quark", 1, "evaluate")["metrics"]
    assert metrics["mean_reward_ci_low"] <= metrics["mean_reward"] <= metrics["mean_reward_ci_high"]
    assert {"perplexity", "distinct_1", "distinct_2", "distinct_3", "reward_p50", "kl_to_reference_ci_low"} <= set(metrics)
    assert all(f"reward_with_control_{k}" in metrics for k in range(5)) and "controllability" in metrics
    assert metrics["control_spread"] == pytest.approx(metrics["reward_with_control_0"] - metrics["reward_with_control_4"])
    # The teacher-forced probe: held-out pairs of round 0's base samples (as many as the gap allows)
    # and every training record scored under every control.
    assert 0 <= metrics["conditioning_pairs"] <= 6 and metrics["conditioning_match_records"] == len(records)
    assert 0 <= metrics["conditioning_match"] <= 1 and 0.2 <= metrics["conditioning_match_chance"] <= 1
    # Round 1 pairs its samples with round 0's base samples (sampled once, in round 0).
    base0 = rows(art, "smoke_online_quark", 0, "evaluate")
    ev1 = rows(art, "smoke_online_quark", 1, "evaluate")
    assert [r["base_completion"] for r in ev1] == [r["base_completion"] for r in base0]
    gains = [r["score"] - r["base_score"] for r in ev1]
    assert metrics["reward_gain"] == pytest.approx(sum(gains) / len(gains))
    assert metrics["reward_gain_ci_low"] <= metrics["reward_gain"] <= metrics["reward_gain_ci_high"]
    # Each round's report: the per-round table with intervals, the pictures, a dozen samples.
    report = (art / "smoke_online_quark/round-1/report.md").read_text()
    assert "| round | reward | gain over base |" in report and "| 1 | " in report and "Data pool: 96 samples" in report
    for name in ("report-reward-vs-kl.png", "report-rewards.png", "report-controls.png"):
        assert f"]({name})" in report and (art / "smoke_online_quark/round-1" / name).read_bytes()[:4] == b"\x89PNG"
    assert (art / "smoke_online_quark/round-0/report.md").exists()
    shown = align("report", "smoke_online_quark", "--artifacts", art, env={"COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "smoke_online_quark" in shown.stdout and (art / "report-smoke_online_quark.png").read_bytes()[:4] == b"\x89PNG"
    missing = align("report", "no_such_experiment", "--artifacts", art)
    assert missing.returncode == 2 and "no_such_experiment has no evaluated round" in missing.stderr
    # A+B names one method over several seeds: here a copy stands in for a second seed (spread 0).
    shutil.copytree(art / "smoke_online_quark", art / "smoke_online_quark_copy")
    seeds = align("report", "smoke_online_quark+smoke_online_quark_copy", "--artifacts", art, env={"COLUMNS": "250"})
    assert seeds.returncode == 0, seeds.stderr
    assert "across seeds" in seeds.stdout and "smoke_online_quark (2)" in seeds.stdout and "± 0.000" in seeds.stdout
    twice = align("report", "smoke_online_quark+smoke_online_quark", "--artifacts", art)
    assert twice.returncode == 2 and "distinct experiments" in twice.stderr

    # The docs' DuckDB queries over every round's pool, as printed there, on these artifacts.
    import duckdb

    readme = (ROOT / "docs" / "online-rounds.md").read_text()
    counts, texts = [q.split('""")', 1)[0].replace("artifacts/quark_movies", str(art / "smoke_online_quark"))
                     for q in readme.split('duckdb.sql("""')[1:3]]
    got = duckdb.sql(counts).fetchall()
    n0 = len(rows(art, "smoke_online_quark", 0, "data_pool"))
    assert [(g[0], g[1], g[2]) for g in got] == [("0", 0, n0), ("1", 0, n0), ("1", 1, n0)]
    # and its join of round 2's pool (here round 1's, the last) with the samples' texts
    joined = duckdb.sql(texts.replace("round-2/data_pool/data", "round-1/data_pool/data")).fetchall()
    best = sorted((r["reward"], r["completion"]) for r in pool1 if r["drawn"] and r["quantile"] == 0)[::-1][:5]
    assert [(g[1], g[3]) for g in joined] == best


def test_nlf_rounds_keep_half_the_old_pool_and_condition_on_the_best_phrase(tmp_path):
    cfg = load_config(NLF)
    results = {(r.round, r.stage): r for r in run_flow_locally(cfg, ArtifactStore(str(tmp_path)))}
    assert all(r.status == "ran" for r in results.values())
    n0 = len(rows(tmp_path, "smoke_online_nlf", 0, "data_pool"))
    pool1 = pooled(tmp_path, "smoke_online_nlf", 1)
    assert sum(r["round"] == 0 for r in pool1) == n0 // 2 and sum(r["round"] == 1 for r in pool1) == n0
    assert {r["conditioning"] for r in rows(tmp_path, "smoke_online_nlf", 0, "sample")} == {None}
    assert {r["conditioning"] for r in rows(tmp_path, "smoke_online_nlf", 1, "sample")} == {"Excellent."}
    phrases = cfg.build_pool.feedback_phrases
    records = rows(tmp_path, "smoke_online_nlf", 1, "build_pool")
    by_key = {(r["prompt_id"], r["completion"]): r["quantile"] for r in pool1}
    assert all(rec["feedback"] == phrases[by_key[(rec["prompt_id"], rec["generation1"])]] for rec in records)
    assert results[(1, "train")].metrics["reference"] == "cached"
