"""Quark's control-token embeddings as a parameter of their own (objectives/quark.py): the split
embedding computes what the plain one does, trains at its own learning rate or alone, and folds
back into the saved model."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT, needs_prepared
from test_objectives import assert_gradient_matches_finite_differences
from stages.config import TrainConfig
from stages.data.tokens import of_record
from stages.services.scoring import score
from stages.training.objectives import make_objective
from stages.training.objectives.quark import ControlEmbedding
from stages.training.trainer import fit

CONTROLS = ["<|quark_0|>", "<|quark_1|>"]
ROWS = [{"prompt_id": p, "prompt": p, "generation1": t, "control": c}
        for p in ["The film was", "A quiet story"]
        for t, c in (("a delight from start to end.", CONTROLS[0]), ("a chore.", CONTROLS[1]))]


def test_the_split_embedding_is_the_plain_one_and_folds_back():
    torch.manual_seed(0)
    plain = torch.nn.Embedding(10, 4)
    original = plain.weight.detach().clone()
    split = ControlEmbedding(plain, 8)
    ids = torch.tensor([[0, 8, 3, 9], [9, 9, 1, 2]])
    torch.testing.assert_close(split(ids), original[ids], rtol=0, atol=0)
    with torch.no_grad():
        split.controls.add_(1.0)
    out = split(ids)
    assert torch.equal(out[0, 0], original[0]) and torch.equal(out[0, 1], original[8] + 1)
    out.sum().backward()  # ids 8 once, 9 three times; the shared matrix is not touched for them
    assert split.controls.grad.tolist() == [[1.0] * 4, [3.0] * 4] and plain.weight.grad[8:].abs().sum() == 0
    folded = split.folded()
    assert folded is plain and torch.equal(plain.weight[8:], original[8:] + 1) and torch.equal(plain.weight[:8], original[:8])


def quark(tmp_path, steps=3, mode="no", **options):
    from stages.services.models import build_tiny_llama, load_causal_lm, load_tokenizer

    path = build_tiny_llama()
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    cfg = TrainConfig(objective="quark", model=str(path), max_length=32, max_prompt_length=8, max_steps=steps,
                      epochs=10, batch_size=2, learning_rate=1e-3, lr_scheduler="constant", mixed_precision=mode,
                      quark={"control_tokens": CONTROLS, "kl_coef": 0.0, **options})
    objective = make_objective(cfg)
    objective.prepare_model(model, tokenizer, ROWS, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, tokenizer, objective, ROWS, cfg, 0, tmp_path / "ckpt", save_to=tmp_path / "model")
    return model, tokenizer, objective, before


@needs_prepared
@pytest.mark.parametrize("mode", ["no", "bf16"])
def test_controls_only_trains_the_control_rows_alone(tmp_path, mode):
    model, tokenizer, objective, before = quark(tmp_path, mode=mode, controls_only=True, control_learning_rate=1e-2)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)  # folded back after training
    vocab = objective.vocab
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            assert not torch.equal(p[vocab:], before[name][vocab:])  # the controls moved
            p = p[:vocab]
            before[name] = before[name][:vocab]
        # bf16 mode: frozen parameters are the bf16 rounding they trained against (precision.py)
        expected = before[name] if mode == "no" else before[name].to(torch.bfloat16).float()
        assert torch.equal(p, expected), name
    from stages.services.models import load_causal_lm

    saved = load_causal_lm(tmp_path / "model")
    assert torch.equal(saved.get_input_embeddings().weight, model.get_input_embeddings().weight)


@needs_prepared
def test_the_controls_train_at_their_own_learning_rate(tmp_path, monkeypatch):
    seen = {}
    adamw = torch.optim.AdamW

    def spy(groups, **kw):
        seen["groups"] = [(len(g["params"]), g["lr"]) for g in groups]
        return adamw(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    model, *_ = quark(tmp_path, steps=1, control_learning_rate=5e-2)
    trainable = sum(1 for _ in model.parameters())
    assert sorted(seen["groups"]) == [(1, 5e-2), (trainable, 1e-3)]  # the tied matrix counts once, the controls once


@needs_prepared
def test_under_lora_the_adapters_and_the_control_rows_train(tmp_path):
    """peft freezes the embedding; the control rows still train (their own parameter), the other
    rows keep the base's values, and the saved model is plain (adapters merged, rows folded)."""
    from stages.services.models import build_tiny_llama, load_causal_lm
    from stages.services.training_setup import prepare

    path = build_tiny_llama()
    cfg = TrainConfig(objective="quark", model=str(path), max_length=32, max_prompt_length=8, max_steps=3, epochs=10,
                      batch_size=2, learning_rate=1e-2, lr_scheduler="constant", mixed_precision="no",
                      lora={"r": 4, "alpha": 8}, quark={"control_tokens": CONTROLS, "kl_coef": 0.0})
    objective, model, tokenizer = prepare(cfg, ROWS, 0)
    start = model.get_base_model().get_input_embeddings().weight.detach().clone()
    fit(model, tokenizer, objective, ROWS, cfg, 0, tmp_path / "ckpt", save_to=tmp_path / "model")
    saved = load_causal_lm(tmp_path / "model")
    assert not any("lora" in n or "controls" in n for n, _ in saved.named_parameters())
    weight, vocab = saved.get_input_embeddings().weight, objective.vocab
    assert torch.equal(weight[:vocab], start[:vocab]) and not torch.equal(weight[vocab:], start[vocab:])


def test_the_other_condition_is_the_next_different_one():
    from stages.training.objectives.conditioned import other_conditions

    assert other_conditions(["a", "a", "b", "c"]) == ["b", "b", "c", "a"]
    assert other_conditions(["a", "a"]) == [None, None]
    assert other_conditions(["a"]) == [None]


def test_condition_contrast_is_the_two_class_bayes_log_loss():
    from stages.training.losses import condition_contrast

    own, other = torch.tensor([-10.0, -12.0, -7.0], dtype=torch.float64), torch.tensor([-11.0, -10.0, -7.0], dtype=torch.float64)
    want = [math.log1p(math.exp(-(a - b))) for a, b in zip(own.tolist(), other.tolist())]  # -log p(own | y), priors equal
    torch.testing.assert_close(condition_contrast(own, other), torch.tensor(want, dtype=torch.float64))


def plain_and_variant(rows, **options):
    """A float64 tiny Llama with the control tokens, and Quark objectives without and with `options`
    (no KL, no entropy), for comparing the two losses term by term."""
    import copy

    from stages.services.models import build_tiny_llama, load_causal_lm, load_tokenizer

    path = build_tiny_llama()
    model, tok = load_causal_lm(path).double(), copy.deepcopy(load_tokenizer(path))
    opts = {"control_tokens": CONTROLS, "kl_coef": 0.0, "entropy_coef": 0.0}
    plain = make_objective(TrainConfig(objective="quark", max_length=32, max_prompt_length=8, quark=opts))
    variant = make_objective(TrainConfig(objective="quark", max_length=32, max_prompt_length=8, quark={**opts, **options}))
    plain.prepare_model(model, tok, rows, 0)
    variant.vocab = plain.vocab
    return model, tok, plain, variant


@needs_prepared
def test_the_contrast_term_adds_the_bayes_loss_of_each_samples_condition_and_its_gradient_is_right():
    """Quark's loss with contrast_coef: the papers' loss plus coef * -log sigmoid(log p(y | own
    token) - log p(y | the next row's other token)), each scored alone; gradients by differences."""
    rows = ROWS + [{**ROWS[0], "control": CONTROLS[0]}]  # the last row's other is the first different one
    model, tok, plain, contrast = plain_and_variant(rows, contrast_coef=0.5)
    base, _ = plain.per_example_loss(model, plain.collate(rows, tok))
    got, metrics = contrast.per_example_loss(model, contrast.collate(rows, tok))
    others = [CONTROLS[1], CONTROLS[0], CONTROLS[1], CONTROLS[0], CONTROLS[1]]
    own = score(model, [of_record(tok, r, "generation1", plain.prefix(r, tok)) for r in rows], tok.pad_token_id, 8,
                (8, 32), vocab=plain.vocab)[0]
    other = score(model, [of_record(tok, r, "generation1", plain.condition_prefix(o, tok)) for r, o in zip(rows, others)],
                  tok.pad_token_id, 8, (8, 32), vocab=plain.vocab)[0]
    want = base + 0.5 * torch.tensor([math.log1p(math.exp(-(a - b))) for a, b in zip(own, other)], dtype=torch.float64)
    # Llama's RMSNorm runs in float32 even in a float64 model: two scoring paths agree to ~1e-6 a token.
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    margin = torch.tensor(own, dtype=torch.float64) - torch.tensor(other, dtype=torch.float64)
    torch.testing.assert_close(metrics["contrast_margin"], margin, rtol=0, atol=1e-4)
    assert_gradient_matches_finite_differences(contrast, model, tok, rows)


@needs_prepared
def test_the_pair_contrast_term_adds_the_double_log_ratio_loss_of_each_record_and_its_partner():
    """Quark's loss with pair_contrast_coef: the papers' loss plus coef * -log sigmoid(log p(y1 |
    c1) + log p(y2 | c2) - log p(y1 | c2) - log p(y2 | c1)), each sequence scored alone; a record
    without a partner adds nothing; gradients by differences."""
    good, bad = ROWS[0], ROWS[1]  # one prompt: the better sample under control 0, the worse under 1
    rows = [{**good, "generation1_reward": 0.9, "generation2": bad["generation1"], "generation2_reward": 0.2, "control2": CONTROLS[1]},
            {**bad, "generation1_reward": 0.2, "generation2": good["generation1"], "generation2_reward": 0.9, "control2": CONTROLS[0]},
            {**ROWS[2], "generation1_reward": 0.5}]  # no partner
    model, tok, plain, paired = plain_and_variant(rows, pair_contrast_coef=0.5)

    def lp(r, generation, control):
        return score(model, [of_record(tok, r, generation, plain.condition_prefix(control, tok))], tok.pad_token_id, 8,
                     (8, 32), vocab=plain.vocab)[0][0]

    base, _ = plain.per_example_loss(model, plain.collate(rows, tok))
    got, metrics = paired.per_example_loss(model, paired.collate(rows, tok))
    margins = []
    for r in rows[:2]:
        c1, c2 = r["control"], r["control2"]
        margins.append(lp(r, "generation1", c1) + lp(r, "generation2", c2) - lp(r, "generation1", c2) - lp(r, "generation2", c1))
    want = base + 0.5 * torch.tensor([math.log1p(math.exp(-m)) for m in margins] + [0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(metrics["pair_margin"][:2], torch.tensor(margins, dtype=torch.float64), rtol=0, atol=1e-4)
    # The row without a partner costs no sequences and logs the others' mean margin (not a 0 that dilutes it).
    batch = paired.collate(rows, tok)
    assert batch["pair_index"].tolist() == [0, 1] and len(batch["pair_input_ids"]) == 3 * 2
    assert metrics["pair_margin"][2].item() == pytest.approx(sum(margins) / 2, abs=1e-4)
    assert metrics["pair_rows"].tolist() == [1.0, 1.0, 0.0]
    assert "pair_input_ids" not in paired.collate(rows[2:], tok)
    alone, alone_metrics = paired.per_example_loss(model, paired.collate(rows[2:], tok))
    torch.testing.assert_close(alone, base[2:], rtol=0, atol=1e-9)
    # Both records of the pair see the same margin: the loss is symmetric in the two.
    assert abs(margins[0] - margins[1]) < 1e-4
    assert_gradient_matches_finite_differences(paired, model, tok, rows)


def test_control_tokens_start_as_their_words_mean_embedding_when_told():
    from stages.services.models import build_tiny_llama, load_causal_lm, load_tokenizer

    path = build_tiny_llama()
    words = ["Excellent", "a chore"]
    cfg = TrainConfig(objective="quark", model=str(path), quark={"control_tokens": CONTROLS, "control_init": words})
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    make_objective(cfg).prepare_model(model, tokenizer, ROWS, 0)
    weight = model.get_input_embeddings().weight
    for token, word in zip(CONTROLS, words):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        expected = sum(weight[i] for i in ids) / len(ids)  # by hand, not by the code's mean
        torch.testing.assert_close(weight[tokenizer.convert_tokens_to_ids(token)], expected)
    plain, plain_tok = load_causal_lm(path), load_tokenizer(path)
    make_objective(TrainConfig(objective="quark", model=str(path), quark={"control_tokens": CONTROLS})).prepare_model(
        plain, plain_tok, ROWS, 0)  # without control_init: drawn, not a word's embedding
    assert not torch.allclose(plain.get_input_embeddings().weight[-2:], weight[-2:])


def test_control_init_needs_one_word_per_control_token():
    from stages.config import load_config

    from stages.pipeline.errors import BadInput

    with pytest.raises(BadInput) as err:
        load_config(ROOT / "configs" / "quark_movies.yaml", ["train.quark.control_init=[Excellent, Good]"])
    # One line that names the field, not the whole config a check across sections was given.
    assert str(err.value) == (f"{ROOT / 'configs' / 'quark_movies.yaml'}: train.quark.control_init: 2 words for 5 "
                              "control tokens (one per quantile, best first)")
