"""Feedback phrases from score buckets ("Excellent.", "Good.", ...): NLF without an LLM."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from stages.annotators.base import Annotator
from stages.pipeline.errors import BadInput
from stages.pipeline.sections import Section


class TemplateFeedback(Annotator):
    """Words the scores of the steps before it; adds no score of its own."""

    kind = "template_feedback"
    scores = False

    class Options(Section):
        kind: Literal["template_feedback"] = "template_feedback"
        # (threshold, phrase), highest first; a score >= threshold gets the phrase.
        buckets: list[tuple[float, str]] = Field(default_factory=lambda: [
            (0.9, "Excellent."), (0.7, "Good."), (0.5, "Okay."), (0.3, "Poor."), (-1e9, "Terrible.")])

    def __init__(self, step):
        super().__init__(step)
        self.buckets = sorted(step.buckets, key=lambda b: -b[0])

    def feedback_for(self, score):
        if score is None or (isinstance(score, float) and math.isnan(score)):
            return None
        return next((phrase for t, phrase in self.buckets if score >= t), self.buckets[-1][1])

    def __call__(self, prompts, completions, scores=None):
        if scores is None or all(s is None for s in scores):
            raise BadInput("needs a scoring step before it")
        return {"feedback": [self.feedback_for(s) for s in scores]}
