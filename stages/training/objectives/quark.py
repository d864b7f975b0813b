"""Quark (Lu et al., 2022): a control token per reward quantile, prefixed to the prompt."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from stages.data.tokens import template_prefix, text_ids
from stages.pipeline.sections import control_prefix_template
from stages.training.objectives.conditioned import ConditionedNLL, ConditionedOptions


class QuarkOptions(ConditionedOptions):
    # Every quantile's token, added before the first training whether or not the draw holds each
    # (a later round's pool may); filled from build_pool (control_token, quantiles).
    control_tokens: list[str] = []
    # The control tokens' embeddings train as a parameter of their own, at this learning rate
    # (None: train.learning_rate); with `controls_only` nothing else trains (prompt tuning of the
    # controls: the policy cannot drift from the reference but through what the tokens mean).
    control_learning_rate: float | None = Field(None, gt=0)
    controls_only: bool = False  # see control_learning_rate
    # Words whose mean token embedding each control token starts from, best quantile's first (one
    # per control token, e.g. ["Excellent", "Good", "Okay", "Poor", "Terrible"]), so the tokens
    # start with the meaning NLF's phrases have (prompt tuning's label initialisation, Lester et
    # al., 2021). Empty: drawn as a typical token, as the paper does.
    control_init: list[str] = []
    # The text before the prompt, with the control token at {control}; sample and evaluate follow it.
    # The paper's puts the token first, which for a decoder without a BOS token (SmolLM2) is its
    # attention-sink position: inside a short text it learns better (measured in docs/quark-nlf.md).
    control_template: str = "{control}{prompt}"
    _template = field_validator("control_template")(control_prefix_template)


class Quark(ConditionedNLL):
    """The policy learns what a sample of each reward quantile looks like; sampling with the best
    quantile's token then steers it towards high reward, while the KL term keeps it near the
    reference."""

    name = "quark"
    needs = ("prompt", "generation1", "control")
    Options = QuarkOptions

    condition_key = "control"

    def condition_prefix(self, condition, tokenizer):
        return tuple(text_ids(tokenizer, template_prefix(self.opt.control_template, control=condition)))

    def prepare_model(self, model, tokenizer, rows, seed):
        add_control_tokens(model, tokenizer, rows, seed, self.opt.control_tokens,
                           dict(zip(self.opt.control_tokens, self.opt.control_init)))
        # The control tokens are conditions, never predictions: the policy's distribution (its
        # log-probs, KL and entropy) covers the original vocabulary, as the sampler's does (it
        # suppresses them), and the tokens' tied output rows get no gradient that would pull
        # their embeddings away from what they mean as inputs.
        ids = tokenizer.convert_tokens_to_ids(self.control_tokens(rows))
        self.vocab = min(ids)
        if sorted(ids) != list(range(self.vocab, self.vocab + len(ids))) or self.vocab + len(ids) != len(tokenizer):
            raise ValueError(f"quark: the control tokens {self.control_tokens(rows)} must be the tokenizer's last "
                             f"entries (ids {ids}, vocabulary {len(tokenizer)})")

    def control_tokens(self, rows) -> list[str]:
        return sorted(set(self.opt.control_tokens) | {r["control"] for r in rows if r.get("control")})

    def prepare_training(self, model):
        # Under LoRA too the control rows train (peft froze the embedding; this parameter is new).
        base = _base(model)
        split = ControlEmbedding(base.get_input_embeddings(), self.vocab)
        base.set_input_embeddings(split)
        self._controls = split.controls
        if self.opt.controls_only:
            for p in model.parameters():
                p.requires_grad_(p is split.controls)

    def finish_training(self, model):
        base = _base(model)
        embedding = base.get_input_embeddings()
        if isinstance(embedding, ControlEmbedding):
            base.set_input_embeddings(embedding.folded())

    def learning_rate_of(self, name, param):
        return self.opt.control_learning_rate if param is getattr(self, "_controls", None) else None


def _base(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ControlEmbedding(nn.Module):
    """The input embedding with the rows of the control tokens (ids >= first) split off as a
    parameter of their own, so that they can train at their own learning rate, or alone. The
    shared (tied) matrix keeps serving the other ids and the LM head; `folded` writes the trained
    rows back into it."""

    def __init__(self, embedding: nn.Embedding, first: int):
        super().__init__()
        self.embedding, self.first = embedding, first
        self.controls = nn.Parameter(embedding.weight.detach()[first:].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        control = ids >= self.first
        out = self.embedding(ids.masked_fill(control, 0))
        rows = self.controls[(ids - self.first).clamp(0, len(self.controls) - 1)].to(out.dtype)
        return torch.where(control[..., None], rows, out)

    def folded(self) -> nn.Embedding:
        with torch.no_grad():
            self.embedding.weight[self.first:] = self.controls.to(self.embedding.weight.dtype)
        return self.embedding


def add_control_tokens(model, tokenizer, rows: list[dict], seed: int, tokens: list[str] = (),
                       init: dict[str, str] | None = None) -> list[str]:
    """Quark's reward tokens: new vocabulary entries whose embeddings are drawn from the mean and
    std of the existing ones (per dimension), so they start as typical, not arbitrary, tokens; a
    token named in `init` starts as the mean embedding of its word's tokens instead."""
    controls = sorted(set(tokens) | {r["control"] for r in rows if r.get("control")})
    new = [t for t in controls if t not in tokenizer.get_vocab()]
    if not new:
        return []
    tokenizer.add_tokens(new, special_tokens=True)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        mean, std = weight[:old].mean(0), weight[:old].std(0)
        g = torch.Generator().manual_seed(seed)
        weight[old:] = mean + std * torch.randn(weight.shape[0] - old, weight.shape[1], generator=g)
        for token, word in (init or {}).items():
            if token in new:
                ids = tokenizer(word, add_special_tokens=False)["input_ids"]
                weight[tokenizer.convert_tokens_to_ids(token)] = weight[ids].mean(0)
    return new
