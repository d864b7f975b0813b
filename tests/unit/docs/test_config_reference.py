"""The config reference page is generated from the config models (flows/config_reference.py): it
is up to date, and every field of every section, objective and annotator has a comment to say what
it does."""

from flows import config_reference as R
from stages.config import RunConfig, SampleConfig
from stages.pipeline.sections import Section
from stages.training.objectives import OBJECTIVES


def test_every_field_is_explained_and_the_page_is_current():
    text, missing = R.page()
    assert missing == [], f"config fields without a comment: {missing}"
    assert R.PAGE.read_text() == text, "docs/config-reference.md is stale: run `align docs`"


def test_the_page_covers_every_section_objective_option_and_annotator():
    text, _ = R.page()
    for name, field in RunConfig.model_fields.items():
        is_section = isinstance(field.annotation, type) and issubclass(field.annotation, Section)
        assert (f"## {name}\n" if is_section else f"| `{name}` |") in text
    for name, cls in OBJECTIVES.items():
        if cls.Options.model_fields:
            assert f"## train.{name}" in text
    assert "## annotate.steps[] kind: reward_model" in text and "## annotate.steps[] kind: openai" in text


def test_a_comment_above_a_field_and_one_after_it_are_both_read():
    found = R.field_comments(SampleConfig)
    assert found["top_k"].startswith("transformers' sampling default")
    assert found["dtype"].startswith("The sampler's weights") and "auto: bfloat16" in found["dtype"]
    assert found["conditioning"].startswith("none; quark_best")  # not the shards comment above it
