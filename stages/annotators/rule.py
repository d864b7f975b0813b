"""A Python callable f(prompts, completions) -> scores, named by its dotted path."""

from __future__ import annotations

import importlib
import os
from typing import Literal

from stages.annotators.base import Annotator
from stages.pipeline.errors import BadInput
from stages.pipeline.sections import Section


def vader_compound(prompts: list[str], completions: list[str]) -> list[float]:
    """The rule-based sentiment reward: vaderSentiment's compound score of the continuation, in [-1, 1]."""
    from stages.data.sources import vader_sentiment

    return vader_sentiment(list(completions))


ALLOW_ENV = "ALIGN_ALLOWED_CALLABLES"


def load_callable(dotted: str, field: str):
    """The callable a config names. A config is code: it can name any importable function. When
    ALIGN_ALLOWED_CALLABLES is set (comma-separated module prefixes; `align serve` and workers
    should set it), only callables under those prefixes load."""
    allowed = [p.strip() for p in os.environ.get(ALLOW_ENV, "").split(",") if p.strip()]
    if allowed and not any(dotted == p or dotted.startswith(p.rstrip(".") + ".") for p in allowed):
        raise BadInput(f"{field}: '{dotted}' is not under {ALLOW_ENV} ({', '.join(allowed)})")
    module, _, name = dotted.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise BadInput(f"{field}: cannot import '{dotted}' ({type(e).__name__})") from None
    if not callable(fn):
        raise BadInput(f"{field}: '{dotted}' is not callable")
    return fn


class Rule(Annotator):
    kind = "rule"

    class Options(Section):
        kind: Literal["rule"] = "rule"
        callable: str = "stages.annotators.vader_compound"  # "package.module.function", f(prompts, completions) -> scores

    def __init__(self, step):
        super().__init__(step)
        self.fn = load_callable(step.callable, "annotate.callable")

    def __call__(self, prompts, completions, scores=None):
        return {"score": self.fn(list(prompts), list(completions))}
