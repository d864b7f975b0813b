"""evaluate's base comparison: the base is sampled plainly (no conditioning, no suppressed tokens)
on the same prompts with the same seed as the conditioned policy, and the gain is paired."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pyarrow as pa
import pytest

from stages import evaluate
from stages.config import AnnotateConfig, EvaluateConfig, SampleConfig, TrainConfig


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_base_is_sampled_plainly_with_the_policys_seed(monkeypatch, dtype):
    """With a bf16 sampler the policy is rescored in float32 for the KL (its recorded -1.0 is
    replaced by the rescoring's -1.5)."""
    calls = []

    def fake_generate(path, texts, cfg, seed, log):
        calls.append((path, cfg.conditioning, list(cfg.suppress_tokens), seed, list(texts)))
        word = "good" if path == "policy" else "bad"
        return [[{"completion": f"{word} {t}", "prompt_ids": [1], "completion_ids": [2, 3], "completion_tokens": 2,
                  "policy_logprob": -1.0, "truncated": False, "conditioning_ids": [9]}] for t in texts]

    monkeypatch.setattr(evaluate, "generate_hf", fake_generate)
    monkeypatch.setattr(evaluate, "resolve_model", lambda name, field: "base")
    monkeypatch.setattr(evaluate, "sequence_logps", lambda path, p, c: [-1.5 if path == "policy" else -2.0] * len(p))
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
    assert metrics["mean_reward"] > metrics["base_mean_reward"]  # "good" beats "bad" under VADER
    assert metrics["reward_gain_ci_low"] > 0
    assert [r["kl"] for r in rows] == ([1.0] * 3 if dtype == "float32" else [0.5] * 3)
