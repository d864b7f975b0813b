"""NLF: training conditioned on natural-language feedback ("feedback: ... input: prompt")."""

from __future__ import annotations

from pydantic import field_validator

from stages.training.objectives.conditioned import ConditionedNLL, ConditionedOptions
from stages.pipeline.sections import conditioning_template
from stages.data.tokens import template_prefix, text_ids


class NLF(ConditionedNLL):
    """Like Quark with words instead of tokens: the feedback a sample got (from an LLM or a
    template) becomes the condition, so the policy learns to produce what good feedback
    describes."""

    name = "nlf"
    needs = ("prompt", "generation1", "feedback")

    class Options(ConditionedOptions):
        feedback_template: str = "feedback: {feedback} input: {prompt}"  # as sample.feedback_template
        _template = field_validator("feedback_template")(conditioning_template)

    condition_key = "feedback"

    def condition_prefix(self, condition, tokenizer):
        return tuple(text_ids(tokenizer, template_prefix(self.opt.feedback_template, feedback=condition)))
