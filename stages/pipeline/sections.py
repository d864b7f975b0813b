"""The base of every config section, shared by stages/config.py and the extensions that declare
their own options next to their code (objectives, annotators)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are errors that name their path, not settings silently ignored; so are inf and
    # NaN (`--set train.learning_rate=.inf` would train to NaN and commit it).
    # A number where text is expected (`hub_split: 2024`, `feedback: 5`) is that text, as YAML wrote it.
    # A field's validation_alias is another library's spelling of it (TRL's per_device_train_batch_size
    # for batch_size, peft's lora_alpha for alpha), accepted beside ours; dumps use our names.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, coerce_numbers_to_str=True,
                              validate_by_name=True, validate_by_alias=True)


def _prefix_template(template: str, condition: str) -> str:
    if not template.endswith("{prompt}") or template.count("{prompt}") != 1 or template.count(condition) != 1:
        raise ValueError(f"must contain {condition} once and end with {{prompt}} (the conditioning is a prefix of the "
                         "prompt)")
    return template


def conditioning_template(template: str) -> str:
    """NLF templates put the conditioning before the prompt, so it is a prefix of the prompt's tokens."""
    return _prefix_template(template, "{feedback}")


def control_prefix_template(template: str) -> str:
    """Quark's: where the control token sits in the text before the prompt."""
    return _prefix_template(template, "{control}")
