"""What the LLM annotators share (local or behind an endpoint): the prompt they are shown, the
score they write, the pairwise judging in both orders. Not an annotator itself."""

from __future__ import annotations

import re
from typing import Callable

from pydantic import Field

from stages.annotators.base import Annotator
from stages.services.models import load_causal_lm, load_tokenizer, model_identity, resolve_model
from stages.pipeline.sections import Section
from stages.data.tokens import keep_last, text_ids

JUDGE_TEMPLATE = ("Which continuation of the movie review is more positive?\n"
                  "Review start: {prompt}\nA: {a}\nB: {b}\nAnswer with A or B.")
FEEDBACK_TEMPLATE = ("Rate how positive this movie review continuation is, then explain briefly.\n"
                     "Review: {prompt}{completion}\nReply as 'Score: N/10. Feedback: ...'")


class LLMOptions(Section):
    model: str | None = None  # default smollm2
    batch_size: int = Field(32, ge=1)  # prompts per forward pass
    max_length: int = Field(128, ge=8)  # tokens of the task prompt shown (its start is cut)


class LocalLLM(Annotator):
    """An annotator that runs a local causal LM (left-padded batches; default SmolLM2)."""

    may_miss = True  # an answer may hold no readable score, a prompt no second sample

    @classmethod
    def identity(cls, step):
        return model_identity(step.model or "smollm2", "annotate.model")

    def __init__(self, step):
        super().__init__(step)
        path = resolve_model(step.model or "smollm2", "annotate.model")
        self.tokenizer = load_tokenizer(path, padding_side="left")
        self.model = load_causal_lm(path).eval()


SCORE_PATTERN = re.compile(r"score\s*[:=]?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.IGNORECASE)


def parse_score(text: str) -> float | None:
    """'Score: 7/10 ...' -> 0.7; None when the answer holds no readable score in [0, 10]."""
    m = SCORE_PATTERN.search(text)
    if not m:
        return None
    value = float(m.group(1))
    return value / 10 if 0 <= value <= 10 else None


def parse_choice(text: str) -> float | None:
    """P(answer A) read from an answer's text: 1.0 for "A", 0.0 for "B", None otherwise."""
    m = re.match(r"\W*(?:answer\W*)?([AB])\b", text.strip(), re.IGNORECASE)
    return None if m is None else (1.0 if m.group(1).upper() == "A" else 0.0)


def shown_prompt(tokenizer, prompt: str, max_tokens: int) -> str:
    """The task prompt as an LLM annotator is shown it: its last max_tokens tokens (the
    continuations it judges are shown whole)."""
    ids = text_ids(tokenizer, prompt)
    return prompt if len(ids) <= max_tokens else tokenizer.decode(keep_last(ids, max_tokens))


def combine(p_a_first: float, p_a_second: float) -> float:
    """P(a beats b) from P("A") with a shown first and P("A") with b shown first."""
    return (p_a_first + (1 - p_a_second)) / 2


def pairwise_scores(prompts: list[str], completions: list[str],
                    p_first: Callable[[list[tuple[str, str, str]]], list[float | None]]) -> list[float | None]:
    """Each sample's mean win probability against the other samples of its prompt, every pair
    judged in both orders (to cancel position bias). p_first gives P("A") for (prompt, a, b)
    items, None where the answer could not be read; such a comparison counts for neither. A sample
    with nothing to be compared with gets None."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    items, pairs = [], []
    for p, idx in groups.items():
        for x in idx:
            for y in idx:
                if x != y:
                    items.append((p, completions[x], completions[y]))
                    pairs.append((x, y))
    answered = dict(zip(pairs, p_first(items)))
    wins: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    for (x, y), pf in answered.items():
        back = answered[(y, x)]
        if x < y and pf is not None and back is not None:
            pref = combine(pf, back)
            wins[x].append(pref)
            wins[y].append(1 - pref)
    return [sum(w) / len(w) if w else None for _, w in sorted(wins.items())]
