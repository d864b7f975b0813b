"""The base of every config section, shared by stages/config.py and the extensions that declare
their own options next to their code (objectives, annotators)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are errors that name their path, not settings silently ignored; so are inf and
    # NaN (`--set train.learning_rate=.inf` would train to NaN and commit it).
    # A number where text is expected (`hub_split: 2024`, `feedback: 5`) is that text, as YAML wrote it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, coerce_numbers_to_str=True)


def conditioning_template(template: str) -> str:
    """NLF templates put the conditioning before the prompt, so it is a prefix of the prompt's tokens."""
    if not template.endswith("{prompt}") or template.count("{prompt}") != 1 or "{feedback}" not in template:
        raise ValueError("must contain {feedback} and end with {prompt} (the conditioning is a prefix of the prompt)")
    return template
