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
