"""The sampler: NucleusSampler draws from exactly the distribution of transformers' temperature
and top-p warpers, on each of its paths (nucleus within the 256 likeliest tokens, within 4096, or
found by a full sort)."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from stages.services.generation import NucleusSampler

V, DRAWS = 5000, 2000


def rows() -> torch.Tensor:
    """Three shapes of next-token distribution, tokens in a random order: mass decaying fast (the
    nucleus within 256 tokens), slowly (within 4096) and flat (neither: a full sort)."""
    g = torch.Generator().manual_seed(0)
    rank = torch.arange(V, dtype=torch.float32)
    shapes = [-0.05 * rank, -0.001 * rank, 0.01 * torch.randn(V, generator=g)]
    return torch.stack([s[torch.randperm(V, generator=g)] for s in shapes])


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 0.9, 0), (0.7, 0.95, 0), (1.3, 0.5, 0), (1.0, 1.0, 0),
                                                       (1.0, 0.9, 50), (1.0, 1.0, 50)])
def test_draws_follow_the_warpers_distribution_on_every_path(temperature, top_p, top_k):
    scores = TemperatureLogitsWarper(temperature)(None, rows().clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    want = TopPLogitsWarper(top_p)(None, scores).softmax(-1)
    scores = rows()
    torch.manual_seed(1)
    sampler = NucleusSampler(temperature, top_p, top_k)
    out = sampler(None, scores.repeat_interleave(DRAWS, 0))
    assert torch.isfinite(out).sum(-1).eq(1).all()  # one finite score per row: greedy takes the draw
    draws = out.argmax(-1).view(3, DRAWS)
    for shape in range(3):
        assert (want[shape, draws[shape]] > 0).all(), "a draw outside the warpers' nucleus"
        freq = torch.bincount(draws[shape], minlength=V).float() / DRAWS
        top = want[shape].topk(5).indices
        p = want[shape, top]
        bound = 4 * (p * (1 - p) / DRAWS).sqrt() + 1e-3
        assert ((freq[top] - p).abs() <= bound).all(), (shape, freq[top], p)
        kept = int((want[shape] > 0).sum())
        # the nucleus is as large as the warpers' (the flat row's draws spread over all of it)
        if shape == 2 and top_p < 1:
            assert torch.unique(draws[shape]).numel() > 0.5 * min(kept, DRAWS)


def test_seeded_draws_repeat():
    scores = rows().repeat_interleave(8, 0)
    sampler = NucleusSampler(1.0, 0.9)
    torch.manual_seed(3)
    a = sampler(None, scores).argmax(-1)
    torch.manual_seed(3)
    assert torch.equal(a, sampler(None, scores).argmax(-1))


@pytest.mark.skipif(not __import__("conftest").tiny_ready(), reason="needs `align models prepare`")
def test_a_quark_samplers_log_probs_are_what_training_scores(tmp_path):
    """The sampler suppresses Quark's control tokens, so the log-probs it records are normalised over
    the original vocabulary; training and scoring use that vocabulary too (`vocab`), so the two agree
    token for token. Including the suppressed tokens in either would make GRPO's ratio and
    importance weights wrong by their probability mass."""
    import logging

    from stages.config import SampleConfig, TrainConfig
    from stages.data.tokens import Sequence
    from stages.services.generation import generate_hf
    from stages.services.models import build_tiny_llama, load_causal_lm, load_tokenizer
    from stages.services.scoring import score
    from stages.training.objectives import make_objective

    controls = ["<|quark_0|>", "<|quark_1|>"]
    path = build_tiny_llama()
    model, tok = load_causal_lm(path), load_tokenizer(path)
    quark = make_objective(TrainConfig(objective="quark", model="tiny-llama", quark={"control_tokens": controls}))
    quark.prepare_model(model, tok, [{"control": c} for c in controls], 0)
    with torch.no_grad():  # make the control tokens likely (their rows along the mean final hidden state)
        ids = torch.tensor([tok("The film was a delight. I left the cinema happy.").input_ids])
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]
        direction = hidden.mean(0)
        model.get_output_embeddings().weight[-2:] = 40 * direction / direction.norm() ** 2
        mass = model(ids).logits[0].softmax(-1)[:, -2:].sum(-1)
    assert mass.min() > 0.2  # what the sampler's log-probs would be off by, were it to include them
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    cfg = SampleConfig(n=2, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, dtype="float32",
                       conditioning="quark_best", control_token=controls[0], suppress_tokens=controls)
    out = generate_hf(str(tmp_path / "policy"), ["The film was", "I left the cinema"], cfg, 0, logging.getLogger())
    samples = [s for per_prompt in out for s in per_prompt]
    assert not any(t in s["completion_ids"] for s in samples for t in tok.convert_tokens_to_ids(controls))
    seqs = [Sequence(s["prompt_ids"], s["completion_ids"], tuple(s["conditioning_ids"])) for s in samples]
    policy = load_causal_lm(str(tmp_path / "policy"))
    _, per_token = score(policy, seqs, tok.pad_token_id, 4, per_token=True, vocab=quark.vocab)
    for s, scored in zip(samples, per_token):
        torch.testing.assert_close(torch.tensor(scored), torch.tensor(s["completion_logps"]), rtol=1e-4, atol=1e-4)


def test_the_two_level_inverse_cdf_draws_what_one_float64_pass_over_the_vocabulary_draws():
    """The same uniform per row picks the same token as the first token whose float64 cumulative
    probability exceeds it (the single-level rule, written out here), on a SmolLM2-sized vocabulary
    (a multiple of the block) and on one that is not."""
    for vocab in (49152, V):
        g = torch.Generator().manual_seed(vocab)
        logits = torch.cat([torch.randn(300, vocab, generator=g) * s for s in (1.0, 3.0, 8.0)])
        logp = torch.log_softmax(logits, -1)
        torch.manual_seed(5)
        drawn = NucleusSampler._inverse_cdf(logp)
        torch.manual_seed(5)
        cdf = logp.double().exp().cumsum(-1)
        u = torch.rand(len(logp), 1, dtype=torch.float64) * cdf[:, -1:]
        want = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=vocab - 1)
        assert torch.equal(drawn, want)


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_reusing_the_recorders_log_softmax_draws_the_same_tokens(top_p):
    from stages.services.generation import TokenLogprobs

    scores = rows().repeat_interleave(64, 0).to(torch.bfloat16)
    torch.manual_seed(2)
    alone = NucleusSampler(1.0, top_p, 0)(None, scores).argmax(-1)
    recorder = TokenLogprobs()
    recorder(torch.zeros(len(scores), 1, dtype=torch.long), scores)
    torch.manual_seed(2)
    shared = NucleusSampler(1.0, top_p, 0, raw=recorder)(None, scores).argmax(-1)
    assert torch.equal(alone, shared)


def fake_model(dtype=torch.bfloat16, **config):
    from types import SimpleNamespace

    weight = torch.zeros(1, dtype=dtype)
    return SimpleNamespace(config=SimpleNamespace(**config), parameters=lambda: iter([weight]))


SMOLLM2 = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, vocab_size=49152)


def test_a_set_batch_size_is_cut_into_whole_prompts():
    from stages.config import SampleConfig
    from stages.services.generation import prompts_per_call

    assert prompts_per_call(SampleConfig(n=4, batch_size=33), fake_model(**SMOLLM2), 20) == 8
    assert prompts_per_call(SampleConfig(n=4, batch_size=3), fake_model(**SMOLLM2), 20) == 1  # never none


def test_auto_fills_the_memory_budget_up_to_the_cap():
    """auto: the KV cache (2 x layers x KV heads x head dim x bytes a value, over the longest prompt
    and the new tokens) and four float32 rows of logits per sequence, in a 1 GiB budget, at most 256
    sequences, in whole prompts."""
    from stages.config import SampleConfig
    from stages.services.generation import AUTO_BUDGET_BYTES, AUTO_MAX_SEQUENCES, prompts_per_call

    # SmolLM2 in bf16, 32 new tokens: ~2 MB a sequence, so the cap binds.
    assert prompts_per_call(SampleConfig(n=4, max_new_tokens=32), fake_model(**SMOLLM2), 24) == AUTO_MAX_SEQUENCES // 4
    # A 7B-shaped model (32 layers, 8 KV heads of 128) over 512 + 256 tokens: 100.7 MB a sequence.
    big = dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               hidden_size=4096, vocab_size=32000)
    per_sequence = 2 * 32 * 8 * 128 * 2 * (512 + 256) + 16 * 32000
    assert AUTO_BUDGET_BYTES // per_sequence == 10
    assert prompts_per_call(SampleConfig(n=2, max_new_tokens=256), fake_model(**big), 512) == 5
    # In float32 the same cache is twice the bytes: 5 sequences, 2 prompts of 2.
    assert prompts_per_call(SampleConfig(n=2, max_new_tokens=256), fake_model(torch.float32, **big), 512) == 2
    # A model whose config does not give the cache's shape: 32 sequences, as before auto.
    assert prompts_per_call(SampleConfig(n=4), fake_model(vocab_size=10), 24) == 8


def test_batch_size_takes_auto_or_a_positive_count(tmp_path):
    from stages.config import load_config
    from stages.pipeline.errors import BadInput

    path = tmp_path / "c.yaml"
    path.write_text("experiment: e\nsample: {batch_size: auto}\n")
    assert load_config(path).sample.batch_size == "auto"
    assert load_config(path, ["sample.batch_size=64"]).sample.batch_size == 64
    with pytest.raises(BadInput, match="sample.batch_size"):
        load_config(path, ["sample.batch_size=0"])
