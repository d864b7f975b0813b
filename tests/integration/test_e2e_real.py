"""The two real flows, shrunk: SFT on SmolLM2-135M and the MiniLM reward model (offline)."""

import math

import pytest

from conftest import ROOT, needs_prepared
from stages.config import load_config
from stages.pipeline.runner import run_flow_locally
from stages.pipeline.store import ArtifactStore

pytestmark = [pytest.mark.slow, needs_prepared]


def test_sft_movies_on_smollm2(tmp_path):
    cfg = load_config(ROOT / "configs" / "sft_movies.yaml", [
        "load_prompts.max_rows=16", "build_pool.heldout_max_records=8", "train.max_steps=3",
        "train.learning_rate=1e-4", "evaluate.max_records=8"])
    results = {r.stage: r for r in run_flow_locally(cfg, ArtifactStore(str(tmp_path)))}
    m = results["evaluate"].metrics
    assert math.isfinite(m["heldout_nll"]) and 1.0 < m["base_heldout_nll"] < 8.0, m
    assert m["heldout_nll"] != m["base_heldout_nll"], "training changed the model"
    assert (tmp_path / "sft_movies/round-0/train/model/model.safetensors").stat().st_size > 500e6


def test_reward_movies_on_minilm(tmp_path):
    cfg = load_config(ROOT / "configs" / "reward_movies.yaml", [
        "build_pool.max_records=512", "build_pool.heldout_max_records=64", "train.batch_size=32",
        "train.learning_rate=1e-4"])
    results = {r.stage: r for r in run_flow_locally(cfg, ArtifactStore(str(tmp_path)))}
    assert results["train"].metrics["steps"] == 16
    # 16 steps already lift MiniLM well above chance on held-out pairs (the full config reaches ~0.84).
    assert results["evaluate"].metrics["pairwise_accuracy"] > 0.6, results["evaluate"].metrics
