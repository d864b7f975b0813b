"""evaluate's base comparison: the base is sampled plainly (no conditioning, no suppressed tokens)
on the same prompts with the same seed as the conditioned policy, and the gain is paired."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pyarrow as pa
import pytest

from stages import evaluate
from stages.config import AnnotateConfig, EvaluateConfig, SampleConfig, TrainConfig
from stages.pipeline.errors import BadInput
from stages.services import sample_metrics as M


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_base_is_sampled_plainly_with_the_policys_seed(monkeypatch, dtype):
    """Whatever sample.dtype says, the policy samples in float32 (the KL takes its recorded
    log-probs) and the base in the configured dtype."""
    calls = []

    def fake_generate(path, texts, cfg, seed, log):
        calls.append((path, cfg.conditioning, list(cfg.suppress_tokens), seed, list(texts), cfg.dtype))
        word = "good" if path == "policy" else "bad"
        return [[{"completion": f"{word} {t}", "prompt_ids": [1], "completion_ids": [2, 3], "completion_tokens": 2,
                  "policy_logprob": -1.0, "truncated": False, "conditioning_ids": [9]}] for t in texts]

    monkeypatch.setattr(evaluate, "generate_hf", fake_generate)
    monkeypatch.setattr(evaluate, "resolve_model", lambda name, field: "base")
    monkeypatch.setattr(evaluate, "sequence_logps", lambda path, p, c: [-2.0] * len(p))  # the reference
    prompts = pa.table({"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "split": ["heldout"] * 3})
    ctx = SimpleNamespace(inputs={"load_prompts": SimpleNamespace(table=lambda: prompts)}, heldout_seed=17, seed=0,
                          round=0, log=logging.getLogger("test"))
    gen = SampleConfig(conditioning="quark_best", control_token="<|quark_0|>", suppress_tokens=["<|quark_4|>"],
                       dtype=dtype)
    cfg = EvaluateConfig(generation=gen, compare_base=True, annotate=AnnotateConfig(
        steps=[{"kind": "rule", "callable": "stages.annotators.vader_compound"}]))

    rows, metrics = evaluate.generate_and_score(ctx, cfg, "policy", TrainConfig(model="base"))

    (policy_call, base_call) = calls
    assert policy_call[:4] == ("policy", "quark_best", ["<|quark_4|>"], 17)
    assert base_call[:4] == ("base", "none", [], 17) and base_call[4] == policy_call[4]
    assert (policy_call[5], base_call[5]) == ("float32", dtype)
    assert metrics["mean_reward"] > metrics["base_mean_reward"]  # "good" beats "bad" under VADER
    assert metrics["reward_gain_ci_low"] > 0
    assert [r["kl"] for r in rows] == [1.0] * 3


def test_several_samples_per_prompt_are_one_unit_of_the_bootstrap(monkeypatch):
    """samples_per_prompt 2: every prompt is sampled twice (policy and base, the same seed), the
    means are over all samples, and the intervals resample prompts, each with its samples' mean."""
    def fake_generate(path, texts, cfg, seed, log):
        assert cfg.n == 2
        return [[{"completion": f"{path} {t} {j}", "prompt_ids": [1], "completion_ids": [2, 3 + j],
                  "completion_tokens": 2, "policy_logprob": -1.0 - j, "truncated": False, "conditioning_ids": []}
                 for j in range(cfg.n)] for t in texts]

    class FakeSteps:
        """Scores: the prompt's index + 0.1 x the sample's; the base's 0.5 lower."""

        def __init__(self, steps):
            self.steps = steps

        def __call__(self, prompts, completions, field, feedback):
            scores = []
            for c in completions:
                who, text, j = c.split()
                scores.append("xyz".index(text) + 0.1 * int(j) - (0.5 if who == "base" else 0.0))
            return scores, None

    monkeypatch.setattr(evaluate, "generate_hf", fake_generate)
    monkeypatch.setattr(evaluate, "Steps", FakeSteps)
    monkeypatch.setattr(evaluate, "resolve_model", lambda name, field: "base")
    monkeypatch.setattr(evaluate, "sequence_logps", lambda path, p, c: [-2.0] * len(p))
    prompts = pa.table({"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "split": ["heldout"] * 3})
    ctx = SimpleNamespace(inputs={"load_prompts": SimpleNamespace(table=lambda: prompts)}, heldout_seed=17, seed=0,
                          round=0, log=logging.getLogger("test"))
    cfg = EvaluateConfig(generation=SampleConfig(dtype="float32"), compare_base=True, samples_per_prompt=2,
                         annotate=AnnotateConfig(steps=[{"kind": "rule", "callable": "stages.annotators.vader_compound"}]))

    rows, metrics = evaluate.generate_and_score(ctx, cfg, "policy", TrainConfig(model="base"))

    order = [r["prompt_id"] for r in evaluate.heldout_prompts(prompts, 0)]
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(p, j) for p in order for j in (0, 1)]
    assert metrics["prompts"] == 3 and metrics["samples"] == 6
    assert metrics["mean_reward"] == pytest.approx((0 + 0.1 + 1 + 1.1 + 2 + 2.1) / 6)
    assert (metrics["mean_reward_ci_low"], metrics["mean_reward_ci_high"]) == M.bootstrap_ci(
        [{"a": 0.05, "b": 1.05, "c": 2.05}[p] for p in order], 0)
    assert metrics["base_mean_reward"] == pytest.approx(metrics["mean_reward"] - 0.5)
    assert metrics["reward_gain_ci_low"] == pytest.approx(0.5) and metrics["reward_gain_ci_high"] == pytest.approx(0.5)
    assert metrics["kl_to_reference"] == pytest.approx((1.0 + 0.0) / 2)  # -1 - j against -2


def _fixed_policy(monkeypatch, completions: dict[str, str]):
    """generate_hf returns `completions[path]` + the prompt; the reference scores -2 a sample."""
    def fake_generate(path, texts, cfg, seed, log):
        return [[{"completion": f"{completions[path]} {t}", "prompt_ids": [1], "completion_ids": [2, 3],
                  "completion_tokens": 2, "policy_logprob": -1.0, "truncated": False, "conditioning_ids": []}]
                for t in texts]

    monkeypatch.setattr(evaluate, "generate_hf", fake_generate)
    monkeypatch.setattr(evaluate, "resolve_model", lambda name, field: "base")
    monkeypatch.setattr(evaluate, "sequence_logps", lambda path, p, c: [-2.0] * len(p))


def _ctx(round_, prompts, round_0=None):
    inputs = {"load_prompts": SimpleNamespace(table=lambda: prompts)}
    if round_0 is not None:
        inputs["evaluate"] = SimpleNamespace(table=lambda: round_0)
    return SimpleNamespace(inputs=inputs, heldout_seed=17, seed=0, round=round_, log=logging.getLogger("test"))


VADER = AnnotateConfig(steps=[{"kind": "rule", "callable": "stages.annotators.vader_compound"}])


def test_later_rounds_pair_with_round_0s_base_samples(monkeypatch):
    """Round 0 keeps each base sample and its score beside the policy's; round 2 samples no base
    but pairs its samples with round 0's (by prompt and sample index), so every round has a paired
    gain, equal to the mean of the per-prompt differences."""
    prompts = pa.table({"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "split": ["heldout"] * 3})
    cfg = EvaluateConfig(generation=SampleConfig(dtype="float32"), compare_base=True, annotate=VADER)
    _fixed_policy(monkeypatch, {"policy": "good", "base": "bad"})
    rows0, m0 = evaluate.generate_and_score(_ctx(0, prompts), cfg, "policy", TrainConfig(model="base"))
    assert [r["base_completion"] for r in rows0] == ["bad x", "bad y", "bad z"]
    assert all(r["base_score"] < 0 < r["score"] for r in rows0)

    calls = []
    _fixed_policy(monkeypatch, {"policy": "great"})  # a base call would raise KeyError
    real = evaluate.generate_hf
    monkeypatch.setattr(evaluate, "generate_hf", lambda path, *a: calls.append(path) or real(path, *a))
    rows2, m2 = evaluate.generate_and_score(_ctx(2, prompts, pa.Table.from_pylist(rows0[::-1])), cfg, "policy",
                                            TrainConfig(model="base"))
    assert calls == ["policy"]
    assert [r["base_completion"] for r in rows2] == ["bad x", "bad y", "bad z"]  # matched, not by position
    assert m2["base_mean_reward"] == pytest.approx(m0["base_mean_reward"])
    diffs = [r["score"] - r["base_score"] for r in rows2]
    assert m2["reward_gain"] == pytest.approx(sum(diffs) / 3)
    assert m2["reward_gain"] == pytest.approx(m2["mean_reward"] - m2["base_mean_reward"])
    assert (m2["reward_gain_ci_low"], m2["reward_gain_ci_high"]) == M.bootstrap_ci(diffs, 0)
    assert m2["reward_gain"] != pytest.approx(m0["reward_gain"])  # "great" and "good" score differently


def test_a_round_0_without_these_prompts_is_a_one_line_error(monkeypatch):
    prompts = pa.table({"prompt_id": ["a", "b"], "prompt": ["x", "y"], "split": ["heldout"] * 2})
    round_0 = pa.table({"prompt_id": ["a"], "sample_index": [0], "base_completion": ["bad x"], "base_score": [-0.5]})
    cfg = EvaluateConfig(generation=SampleConfig(dtype="float32"), compare_base=True, annotate=VADER)
    _fixed_policy(monkeypatch, {"policy": "good"})
    with pytest.raises(BadInput, match="round 0's base samples lack held-out prompt 'b'"):
        evaluate.generate_and_score(_ctx(1, prompts, round_0), cfg, "policy", TrainConfig(model="base"))


def test_no_base_in_round_0_means_no_gain_later(monkeypatch):
    """A round 0 that sampled no base (compare_base was off, or it had no reward) leaves later rounds without one."""
    prompts = pa.table({"prompt_id": ["a"], "prompt": ["x"], "split": ["heldout"]})
    round_0 = pa.table({"prompt_id": ["a"], "sample_index": [0], "score": [0.3]})
    cfg = EvaluateConfig(generation=SampleConfig(dtype="float32"), compare_base=True, annotate=VADER)
    _fixed_policy(monkeypatch, {"policy": "good"})
    rows, metrics = evaluate.generate_and_score(_ctx(1, prompts, round_0), cfg, "policy", TrainConfig(model="base"))
    assert "base_mean_reward" not in metrics and "reward_gain" not in metrics and "base_score" not in rows[0]


def test_held_out_prompts_are_distinct_and_ordered_by_their_text_alone():
    """A pool of several samples a prompt gives each held-out prompt once, in the order a table of
    the same prompts one row each gives them (so online and offline flows evaluate the same ones)."""
    texts = [f"opening {i}" for i in range(30)]
    one_each = pa.table({"prompt_id": texts, "prompt": texts, "split": ["heldout"] * 30})
    pooled = [{"prompt_id": t, "prompt": t, "split": "heldout"} for t in reversed(texts) for _ in range(4)]
    pooled += [{"prompt_id": "train 1", "prompt": "train 1", "split": "train"}]
    pooled = pa.Table.from_pylist(pooled)
    order = [r["prompt"] for r in evaluate.heldout_prompts(one_each, 3)]
    assert sorted(order) == sorted(texts) and order != texts  # shuffled, each once
    assert [r["prompt"] for r in evaluate.heldout_prompts(pooled, 3)] == order
    assert [r["prompt"] for r in evaluate.heldout_prompts(one_each, 4)] != order  # the seed's order
