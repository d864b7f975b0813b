"""Every objective trains end to end on the tiny model through its smoke config (no Prefect)."""

import json
import math
import re

import pytest

from conftest import ROOT, needs_prepared
from stages.config import load_config
from stages.pipeline.runner import run_flow_locally
from stages.pipeline.store import ArtifactStore

pytestmark = needs_prepared


@pytest.mark.parametrize("name", ["smoke_dpo", "smoke_kto", "smoke_quark", "smoke_nlf", "smoke_rl", "smoke_reward",
                                  "smoke_simpo", "smoke_orpo"])
def test_objective_trains(tmp_path, name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    results = {r.stage: r for r in run_flow_locally(cfg, ArtifactStore(str(tmp_path)))}
    assert all(r.status == "ran" for r in results.values())
    history = [json.loads(line) for line in
               (tmp_path / cfg.experiment / "round-0/train/metrics.jsonl").read_text().splitlines()]
    assert history and all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)
    assert all(math.isfinite(v) for v in results["evaluate"].metrics.values() if isinstance(v, float))
    if "reference" in cfg.stages:
        assert results["train"].metrics["reference"] == "cached"


def test_quark_adds_control_tokens_with_typical_embeddings(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(ROOT / "configs" / "smoke_quark.yaml", ["stages=[load_prompts, build_pool, train]"])
    run_flow_locally(cfg, ArtifactStore(str(tmp_path)))
    out = tmp_path / "smoke_quark/round-0/train/model"
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.convert_tokens_to_ids([f"<|quark_{k}|>" for k in range(5)])
    assert len(set(ids)) == 5 and min(ids) >= 49152
    emb = AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight
    old, new = emb[:49152], emb[ids]
    assert torch.allclose(new.mean(), old.mean(), atol=0.05) and 0.5 < new.std() / old.std() < 1.5


def test_dpo_beta_change_reuses_reference_log_probs(tmp_path):
    store = ArtifactStore(str(tmp_path))
    cfg = load_config(ROOT / "configs" / "smoke_dpo.yaml", ["train.epochs=1"])
    run_flow_locally(cfg, store)
    again = {r.stage: r.status for r in run_flow_locally(load_config(ROOT / "configs" / "smoke_dpo.yaml",
                                                                     ["train.epochs=1", "train.dpo.beta=0.3"]), store)}
    assert again == {"load_prompts": "skipped", "build_pool": "skipped", "reference": "skipped",
                     "train": "ran", "evaluate": "ran"}


def test_resident_reference_and_lora(tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke_dpo.yaml", [
        "stages=[load_prompts, build_pool, train, evaluate]", "train.epochs=1", "train.lora={r: 4, alpha: 8}"])
    results = {r.stage: r for r in run_flow_locally(cfg, ArtifactStore(str(tmp_path)))}
    assert results["train"].metrics["reference"] == "resident"
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "smoke_dpo/round-0/train/model")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_offline_evaluate_also_samples_and_scores_when_asked(tmp_path):
    """An offline flow's evaluate reports the objective's held-out metrics and, with `generation`
    and `annotate` set, the trained policy's scored samples, as the online flows do."""
    cfg = load_config(ROOT / "configs" / "smoke_dpo.yaml", [
        "train.epochs=1", "evaluate.generation={max_new_tokens: 8, batch_size: 8}",
        "evaluate.annotate={steps: [{kind: rule}]}", "evaluate.max_prompts=6", "evaluate.compare_base=true"])
    results = {r.stage: r for r in run_flow_locally(cfg, ArtifactStore(str(tmp_path)))}
    metrics = results["evaluate"].metrics
    assert {"heldout_loss", "heldout_reward_accuracy", "mean_reward", "base_mean_reward", "kl_to_reference"} <= set(metrics)
    assert metrics["prompts"] == 6 and metrics["records"] > 0


def test_evaluate_says_its_result_in_words(tmp_path, caplog):
    """The line users (and the UI's run log) read: the objective's own summary."""
    import logging

    caplog.set_level(logging.INFO, logger="align")
    run_flow_locally(load_config(ROOT / "configs" / "smoke.yaml"), ArtifactStore(str(tmp_path)))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate: held-out"))
    assert re.fullmatch(r"evaluate: held-out NLL per token \d+\.\d{4} \(base model \d+\.\d{4}\)", line)


def test_training_metrics_go_to_an_experiment_tracker_when_asked(tmp_path):
    """train.log_with: accelerate's trackers; TensorBoard's event file lands in the train artifact."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["stages=[load_prompts, build_pool, train]",
                                                        "train.log_with=[tensorboard]"])
    run_flow_locally(cfg, ArtifactStore(str(tmp_path)))
    train = tmp_path / "smoke/round-0/train"
    events = list((train / "tracking").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in the train artifact"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    history = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    logged = [e.value for e in acc.Scalars("loss")]
    assert logged == pytest.approx([h["loss"] for h in history], rel=1e-6)
