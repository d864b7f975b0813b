"""The teacher-forced conditioning probe (stages/services/conditioning_probe.py): its counting on
hand-built values, then a tiny Llama trained by Quark until it conditions perfectly (the probe
scores 1 on prompts it never saw) against the same model untrained (chance)."""

from __future__ import annotations

import random

import pytest

from conftest import needs_prepared
from stages.config import TrainConfig
from stages.services import conditioning_probe as P
from stages.training.objectives import make_objective

GOOD = ["a delight from start to end.", "moving and warm.", "a joy, funny and wise."]
BAD = ["a chore.", "dull and far too long.", "a mess with no heart."]
CONTROLS = ["<|quark_0|>", "<|quark_1|>"]


def test_pairs_are_within_a_prompt_and_need_the_gap():
    rows = [{"prompt_id": "a", "score": 0.9}, {"prompt_id": "a", "score": 0.1}, {"prompt_id": "a", "score": 0.8},
            {"prompt_id": "b", "score": 0.2}, {"prompt_id": "b", "score": 0.7}, {"prompt_id": "c", "score": None}]
    assert P.heldout_pairs(rows, 0.2) == [(0, 1), (2, 1), (4, 3)]  # (0, 2) differ by 0.1 only; c is unscored
    assert P.heldout_pairs(rows, 0.0) == [(0, 1), (0, 2), (2, 1), (4, 3)]


def test_outcomes_count_ties_as_halves_and_need_a_strict_argmax():
    assert P.pairwise_outcomes([2.0, -1.0, 0.5, 0.5], [(0, 1), (1, 0), (2, 3)]) == [1.0, 0.0, 0.5]
    logps = [[-1.0, -3.0, -2.0], [-4.0, -3.0, -3.0], [-5.0, -1.0, -9.0]]
    assert P.match_outcomes(logps, [0, 1, 1]) == [1.0, 0.0, 1.0]  # the middle one ties: no match


def quark_policy(steps: int, tmp_path):
    from stages.services.models import build_tiny_llama, load_causal_lm, load_tokenizer
    from stages.services.training_setup import attach_reference
    from stages.training.trainer import fit

    path = build_tiny_llama()
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    cfg = TrainConfig(objective="quark", model=str(path), max_length=32, max_prompt_length=8, epochs=100,
                      max_steps=max(steps, 1), lr_scheduler="constant", learning_rate=3e-3, batch_size=6,
                      mixed_precision="no", quark={"control_tokens": CONTROLS})
    objective = make_objective(cfg)
    rows = [{"prompt_id": p, "prompt": p, "generation1": t, "control": c}
            for p in ["The film was", "A quiet story", "Its second half", "The cast"]
            for texts, c in ((GOOD, CONTROLS[0]), (BAD, CONTROLS[1])) for t in texts]
    objective.prepare_model(model, tokenizer, rows, 0)
    if steps:
        attach_reference(objective, cfg, rows, model)
        fit(model, tokenizer, objective, rows, cfg, 0, tmp_path / "quark")
    return model.eval(), tokenizer, objective, rows


def heldout_rows() -> list[dict]:
    """Unseen prompts, each with a good and a bad sample scored apart."""
    prompts = ["The ending", "Every scene", "Its music", "The director"]
    return [{"prompt_id": p, "prompt": p, "generation1": t, "score": s}
            for i, p in enumerate(prompts) for t, s in ((GOOD[i % 3], 0.9), (BAD[(i + 1) % 3], 0.1))]


@needs_prepared
def test_a_policy_that_conditions_perfectly_scores_one(tmp_path):
    model, tokenizer, objective, rows = quark_policy(60, tmp_path)
    assert objective.vocab == len(tokenizer) - 2  # the control tokens are the last two ids
    outcomes, scored = P.heldout_probe(model, tokenizer, objective, heldout_rows(), CONTROLS, 0.2)
    assert scored == 8 and outcomes == [1.0] * 4
    match, chance = P.pool_match(model, tokenizer, objective, rows, CONTROLS, 100, 0)
    assert len(match) == len(rows) and chance == 0.5 and sum(match) == len(rows)


@needs_prepared
def test_an_untrained_policy_scores_chance(tmp_path):
    """Random control embeddings and random labels: the probe's mean is 0.5 in expectation; 80
    pairs put it within 0.5 +- 0.17 (3 standard deviations)."""
    model, tokenizer, objective, _ = quark_policy(0, tmp_path)
    rng = random.Random(0)
    words = (" ".join(GOOD + BAD)).split()
    rows = [{"prompt_id": f"p{i // 2}", "prompt": "The film was", "score": rng.random() * 0.2 + (0.8 if i % 2 else 0),
             "generation1": " ".join(rng.choices(words, k=6))} for i in range(160)]
    rng.shuffle(rows)
    outcomes, _ = P.heldout_probe(model, tokenizer, objective, rows, CONTROLS, 0.2)
    assert len(outcomes) == 80
    assert 0.33 <= sum(outcomes) / len(outcomes) <= 0.67
