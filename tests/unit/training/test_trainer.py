"""The training loop's guards: a step whose loss or gradient norm is not finite stops training
before the update, naming the step."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_prepared
from stages.config import TrainConfig
from stages.training.objectives import make_objective
from stages.training.trainer import NonFiniteLoss, fit, shard

ROWS = [{"prompt": "The film was", "generation1": "a delight.", "generation2": "a chore.",
         "reference_logp1": -20.0, "reference_logp2": -10.0}] * 8


@needs_prepared
def test_a_non_finite_loss_stops_training_before_the_update(tmp_path):
    from stages.services.models import build_tiny_llama, load_causal_lm, load_tokenizer

    path = build_tiny_llama()
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    cfg = TrainConfig(objective="dpo", model=str(path), max_length=32, max_prompt_length=8, batch_size=4,
                      reference="cached")
    objective = make_objective(cfg)
    objective.prepare_model(model, tokenizer, ROWS, 0)
    rows = [{**r, "reference_logp1": float("nan")} for r in ROWS]  # every loss is NaN from step 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLoss, match=r"train: step 1/2: loss nan"):
        fit(model, tokenizer, objective, rows, cfg, 0, tmp_path)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the NaN step updated the weights"


@pytest.mark.parametrize("sizes, world", [([1, 1, 1, 1, 1], 2), ([2, 2, 1], 2), ([1], 2), ([3, 1, 2, 2], 3)])
def test_shards_keep_groups_whole_and_cover_the_batch_once(sizes, world):
    micro = [{"g": g, "i": i} for g, n in enumerate(sizes) for i in range(n)]
    parts = [shard(micro, r, world, "g") for r in range(world)]
    assert [r for p in parts for r in p] == micro  # contiguous, in order, each row once
    for p in parts:
        for q in parts:
            if p is not q:
                assert not {r["g"] for r in p} & {r["g"] for r in q}  # a group lives on one process


@needs_prepared
def test_grpo_takes_num_iterations_steps_on_each_batch(tmp_path):
    """Each batch is trained on num_iterations times in a row: the first step's ratio to the
    sampling policy is 1 (the recorded log-probs are the policy's own), the repeat's is not."""
    from stages.services.models import build_tiny_llama, load_causal_lm, load_tokenizer
    from stages.training.objectives import batch_token_logps

    path = build_tiny_llama()
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    cfg = TrainConfig(objective="grpo", model=str(path), max_length=32, max_prompt_length=8, batch_size=1,
                      learning_rate=1e-2, lr_scheduler="constant", grpo={"beta": 0.0, "num_iterations": 2},
                      mixed_precision="no")  # the recorded log-probs below are float32's: the first ratio is exactly 1
    objective = make_objective(cfg)
    rows = [{"prompt_id": pid, "prompt": p, "generation1": g, "generation1_reward": r}
            for pid, p in (("a", "The film was"), ("b", "A quiet story")) for g, r in (("a delight.", 1.0), ("dull.", 0.0))]
    once = make_objective(cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"num_iterations": 1})}))
    with torch.no_grad():
        for r in rows:  # what the sample stage records: the policy's own per-token log-probs
            batch = once.collate([r], tokenizer)
            lp, mask = batch_token_logps(model, batch)
            r["generation1_logps"] = lp[mask.bool()].tolist()
    history = fit(model, tokenizer, objective, rows, cfg, 0, tmp_path)
    assert len(history) == 4  # 2 prompt groups x 2 iterations
    assert history[0]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert abs(history[1]["ratio"] - 1.0) > 1e-3  # the same batch, after one update
