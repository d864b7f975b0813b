"""The Annotator base class and its registry.

An annotator is one small interface: `annotator(prompts, completions, scores=None) -> columns`, a
dict of equal-length lists: "score" (a float, or None when it could not be read, never guessed)
and/or "feedback" (text). `scores` holds the scores of the steps before it (template_feedback
words them). stages/services/annotation.py runs the steps and checks what comes back.

A subclass that sets `kind` registers itself; its `Options` (with `kind: Literal["<kind>"]`) is
the schema of an `annotate.steps[]` entry of that kind.
"""

from __future__ import annotations

from typing import ClassVar

from stages.pipeline.sections import Section

ANNOTATORS: dict[str, type["Annotator"]] = {}


class Annotator:
    kind: ClassVar[str | None] = None
    scores: ClassVar[bool] = True  # False: it only words the scores of earlier steps (no score column)
    may_miss: ClassVar[bool] = False  # its score may be None (an LLM's answer held none)

    class Options(Section):
        pass

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kind"):
            if cls.kind in ANNOTATORS:
                raise TypeError(f"annotator '{cls.kind}' is registered twice")
            ANNOTATORS[cls.kind] = cls

    def __init__(self, step):
        self.step = step

    @classmethod
    def identity(cls, step) -> dict | None:
        """What enters the annotate stage's fingerprint besides the step's options (a model's hash)."""
        return None

    def __call__(self, prompts: list[str], completions: list[str], scores=None) -> dict[str, list]:
        raise NotImplementedError
