"""Online rounds on the tiny model, annotators and reweighters with known answers, and bad
annotators failing cleanly."""

import json
import logging
import math

import pytest

from conftest import ROOT, needs_prepared
from stages import reweight as R
from stages.annotators.llm import combine, parse_score
from stages.annotators.llm_judge import LLMJudge
from stages.annotators.template_feedback import TemplateFeedback
from stages.config import annotator_step, load_config
from stages.pipeline.errors import BadInput
from stages.pipeline.runner import run_flow_locally
from stages.pipeline.store import ArtifactStore


# -- reweighters ---------------------------------------------------------------------------------

def test_importance_weights_on_hand_made_logprobs():
    rows = [{"policy_logprob": -10.0}, {"policy_logprob": -12.0}, {"policy_logprob": -8.0}]
    train = [-10.0, -11.0, -10.0]  # ratios e^0, e^1, e^-2
    raw = [1.0, math.e, math.exp(-2)]
    mean = sum(raw) / 3
    assert R.importance(rows, train, clip=100) == pytest.approx([x / mean for x in raw])
    clipped = R.importance(rows, train, clip=1.5)
    assert clipped == pytest.approx([1 / mean, 1.5, math.exp(-2) / mean])


def test_reward_softmax_balance_and_ess():
    rows = [{"prompt_id": "a", "score": 1.0}, {"prompt_id": "a", "score": 0.0}, {"prompt_id": "b", "score": 5.0}]
    w = R.reward_softmax(rows, temperature=1.0)
    assert w[:2] == pytest.approx([2 * math.e / (math.e + 1), 2 / (math.e + 1)]) and w[2] == pytest.approx(1.0)
    rows = [{"score": s} for s in (0.1, 0.2, 0.3, 0.9)]
    b = R.balance(rows, "median", 5)
    assert sum(b[:2]) == pytest.approx(sum(b[2:]))  # equal total weight above and below the median
    assert R.effective_sample_size([1.0, 1.0, 1.0, 1.0]) == 4
    assert R.effective_sample_size([4.0, 0.0, 0.0, 0.0]) == 1


# -- annotators ----------------------------------------------------------------------------------

def test_judge_combines_both_orders_to_cancel_position_bias():
    # A judge that always says "A" with 0.8: shown first or second, a sample is no better than the other.
    assert combine(0.8, 0.8) == pytest.approx(0.5)
    # A consistent judge: prefers `a` in both orders.
    assert combine(0.9, 0.2) == pytest.approx(0.85)


def test_score_parsing_never_guesses():
    assert parse_score("Score: 7/10. Feedback: upbeat.") == pytest.approx(0.7)
    assert parse_score("score=9.5") == pytest.approx(0.95)
    assert parse_score("I liked it a lot!") is None
    assert parse_score("Score: 42/10") is None


def test_template_feedback_buckets():
    fb = TemplateFeedback(annotator_step(kind="template_feedback"))
    assert [fb.feedback_for(s) for s in (0.95, 0.75, 0.5, 0.31, 0.0, None)] == \
        ["Excellent.", "Good.", "Okay.", "Poor.", "Terrible.", None]


@needs_prepared
def test_llm_judge_on_a_real_prompt_order_swap():
    judge = LLMJudge(annotator_step(kind="llm_judge", model="tiny-llama", batch_size=4))
    out = judge(["The film", "The film"], ["was wonderful.", "was awful."])
    a, b = out["score"]
    assert a == pytest.approx(1 - b) and 0 < a < 1
    # It computes the last position's logits only (logits_to_keep=1): the same P("A") as reading
    # them off the full [batch, time, vocab] logits, on a batch whose left padding differs.
    import torch

    items = [("The film", "was wonderful.", "was awful."), ("A long and quiet film", "bored me.", "moved me deeply.")]
    texts = [judge.render(*it) for it in items]
    enc = judge.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        full = judge.model(**enc, position_ids=(enc.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1].float()
    want = full[:, judge.answer_ids].log_softmax(-1)[:, 0].exp().tolist()
    assert judge.p_first(items) == pytest.approx(want, abs=1e-6)


# -- flows ---------------------------------------------------------------------------------------

@needs_prepared
@pytest.mark.parametrize("name", ["smoke_online_dpo", "smoke_online_kto", "smoke_online_rl", "smoke_online_grpo"])
def test_online_flow_runs_two_rounds(tmp_path, name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    results = run_flow_locally(cfg, ArtifactStore(str(tmp_path)))
    assert [r.round for r in results if r.stage == "evaluate"] == [0, 1]
    base = tmp_path / cfg.experiment
    s1 = json.loads((base / "round-1/sample/manifest.json").read_text())
    assert s1["inputs"]["train"]["path"].endswith("round-0/train"), "round 1 samples from round 0's policy"
    assert s1["inputs"]["load_prompts"]["path"].endswith("round-0/load_prompts")
    assert not (base / "round-1/load_prompts").exists()
    evals = [r.metrics for r in results if r.stage == "evaluate"]
    assert all(math.isfinite(m["mean_reward"]) and math.isfinite(m["kl_to_reference"]) for m in evals)
    again = run_flow_locally(cfg, ArtifactStore(str(tmp_path)))
    assert {r.status for r in again} == {"skipped"}


@needs_prepared
@pytest.mark.parametrize("rule, message", [
    ("rules.raises", "raised ValueError: the scorer broke"),
    ("rules.returns_nan", "returned nan for sample 0"),
    ("rules.too_few", "returned 23 scores for 24 samples"),
    ("rules.nope", "cannot import 'rules.nope'"),
])
def test_bad_annotator_fails_cleanly_and_rerun_resumes_at_annotate(tmp_path, rule, message):
    overrides = ["rounds=1", "stages=[load_prompts, sample, annotate, build_pool]"]
    good = load_config(ROOT / "configs/smoke_online_dpo.yaml", overrides + ["annotate.steps=[{kind: rule, callable: rules.count_e}]"])
    bad = load_config(ROOT / "configs/smoke_online_dpo.yaml", overrides + [f"annotate.steps=[{{kind: rule, callable: {rule}}}]"])
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(BadInput) as e:
        run_flow_locally(bad, store)
    assert message in str(e.value) and "\n" not in str(e.value)
    base = tmp_path / "smoke_online_dpo/round-0"
    assert (base / "sample/manifest.json").exists() and not (base / "annotate").exists()
    sample_before = (base / "sample/manifest.json").read_text()
    status = {r.stage: r.status for r in run_flow_locally(good, store)}
    assert status == {"load_prompts": "skipped", "sample": "skipped", "annotate": "ran", "build_pool": "ran"}
    assert (base / "sample/manifest.json").read_text() == sample_before


@needs_prepared
def test_sampling_is_seeded(tmp_path):
    cfg = load_config(ROOT / "configs/smoke_online_dpo.yaml", ["rounds=1", "stages=[load_prompts, sample]"])
    run_flow_locally(cfg, ArtifactStore(str(tmp_path / "a")))
    run_flow_locally(cfg, ArtifactStore(str(tmp_path / "b")))
    a = (tmp_path / "a/smoke_online_dpo/round-0/sample/data.parquet").read_bytes()
    assert a == (tmp_path / "b/smoke_online_dpo/round-0/sample/data.parquet").read_bytes()
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "a/smoke_online_dpo/round-0/sample/data.parquet").to_pylist()
    assert {r["sample_index"] for r in rows} == {0, 1}
    assert all(r["policy_logprob"] < 0 and r["completion_tokens"] > 0 and r["checkpoint"] for r in rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_importance_rescoring_uses_the_sampled_tokens(tmp_path, dtype):
    """Scored by the policy that sampled them, in the context it sampled them in (here a feedback
    prefix), the recorded token ids give back the recorded log-probs: importance weights of 1 (to
    bf16's precision, for a bf16 sampler)."""
    import pyarrow.parquet as pq

    from stages.services.models import resolve_model

    cfg = load_config(ROOT / "configs/smoke_online_dpo.yaml",
                      ["rounds=1", "stages=[load_prompts, sample]", "sample.conditioning=feedback",
                       "sample.conditioning_from_round=0", f"sample.dtype={dtype}"])
    run_flow_locally(cfg, ArtifactStore(str(tmp_path)))
    rows = pq.read_table(tmp_path / "smoke_online_dpo/round-0/sample/data.parquet").to_pylist()
    assert all(r["conditioning"] and len(r["completion_ids"]) == r["completion_tokens"] for r in rows)
    assert all(r["conditioning_ids"] for r in rows)
    got = R.sequence_logps(resolve_model(cfg.sample.model), [r["conditioning_ids"] + r["prompt_ids"] for r in rows],
                           [r["completion_ids"] for r in rows])
    tol = 1e-3 if dtype == "float32" else 0.01 * max(r["completion_tokens"] for r in rows)
    assert got == pytest.approx([r["policy_logprob"] for r in rows], abs=tol)
    # per token, as GRPO's ratio reads them: one per completion token, summing to the total
    assert all(len(r["completion_logps"]) == len(r["completion_ids"]) for r in rows)
    assert [sum(r["completion_logps"]) for r in rows] == pytest.approx([r["policy_logprob"] for r in rows], abs=1e-3)
    if dtype == "float32":
        assert R.importance(rows, got, clip=10) == pytest.approx([1.0] * len(rows), abs=1e-2)


@needs_prepared
def test_recorded_policy_logprob_equals_teacher_forced_pass():
    """The log-probs read off generate's raw logits are the policy's own (temperature 1, no top-p),
    whatever sampling temperature and top-p drew the tokens, with left padding in the batch."""
    import torch
    from transformers import LogitsProcessorList

    from stages.training.logprobs import completion_token_logps
    from stages.services.models import load_causal_lm, load_tokenizer, resolve_model
    from stages.services.generation import TokenLogprobs
    from stages.data.tokens import pad

    path = resolve_model("tiny-llama")
    tok, model = load_tokenizer(path, padding_side="left"), load_causal_lm(path).eval()
    enc = tok(["The movie was", "I did not expect the ending to be so", "Acting"], add_special_tokens=False,
              padding=True, return_tensors="pt")
    recorder = TokenLogprobs()
    torch.manual_seed(0)
    with torch.no_grad():
        gen = model.generate(**enc, do_sample=True, temperature=1.7, top_p=0.8, max_new_tokens=12,
                             num_return_sequences=2, pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([recorder]))
    got = recorder.finish(gen)
    width = enc.input_ids.shape[1]
    assert got.shape == (6, gen.shape[1] - width)
    for j in range(6):
        prompt = enc.input_ids[j // 2][enc.attention_mask[j // 2].bool()].tolist()
        new = gen[j, width:].tolist()
        batch = {"input_ids": pad([prompt + new], 0), "attention_mask": pad([[1] * (len(prompt) + len(new))], 0),
                 "completion_mask": pad([[0] * len(prompt) + [1] * len(new)], 0)}
        with torch.no_grad():
            want = completion_token_logps(model, **batch)[0][0, len(prompt) - 1:]
        torch.testing.assert_close(got[j], want, atol=1e-4, rtol=0)


@needs_prepared
def test_suppressed_tokens_are_never_sampled():
    """sample.suppress_tokens (Quark's control tokens): the policy conditions on them, never writes them."""
    from stages.config import SampleConfig
    from stages.services.generation import generate_hf
    from stages.services.models import load_tokenizer, resolve_model

    path = resolve_model("tiny-llama")
    tok = load_tokenizer(path)
    banned = [t for t, i in tok.get_vocab().items() if i % 2 == 0 and i != tok.eos_token_id]
    cfg = SampleConfig(n=4, max_new_tokens=12, batch_size=16, suppress_tokens=banned)
    out = generate_hf(path, ["The movie was", "I thought the plot"], cfg, seed=0, log=logging.getLogger("t"))
    ids = [i for gens in out for g in gens for i in g["completion_ids"]]
    assert len(ids) > 40 and all(i % 2 == 1 or i == tok.eos_token_id for i in ids)


@needs_prepared
def test_scoring_a_token_the_model_lacks_names_it():
    from stages.services.models import resolve_model
    from stages.services.scoring import sequence_logps

    with pytest.raises(ValueError, match=r"token id 49160 is outside the model's vocabulary of 49152"):
        sequence_logps(resolve_model("tiny-llama"), [[1, 2, 3]], [[5, 49160]])
