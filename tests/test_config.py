from pathlib import Path

import pytest

from stages.config import apply_overrides, load_config, validate_config
from stages.errors import BadInput


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "experiment: e\ntrain:\n  batch_size: 2\n"),
                      ["train.learning_rate=1e-4", "load_prompts.columns.prompt=question", "stages=[load_prompts]"])
    assert cfg.train.batch_size == 2 and cfg.train.learning_rate == 1e-4
    assert cfg.load_prompts.columns == {"prompt": "question"}
    assert cfg.stages == ["load_prompts"]


def test_experiment_defaults_to_file_stem(tmp_path):
    assert load_config(write(tmp_path, "seed: 3\n", "my_run.yaml")).experiment == "my_run"


@pytest.mark.parametrize("text, expected", [
    ("train: [unclosed\n", "malformed YAML at line"),
    ("experiment: e\ntrain:\n  lr: 1\n", "unknown key 'train.lr'"),
    ("experiment: e\ntrain:\n  batch_size: many\n", "bad value for 'train.batch_size'"),
    ("experiment: e\nstages: [load_prompts, sampling]\n", "bad value for 'stages.1'"),
    ("experiment: 'bad name!'\n", "bad value for 'experiment'"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_errors_name_the_key(tmp_path, text, expected):
    with pytest.raises(BadInput) as e:
        load_config(write(tmp_path, text))
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(BadInput, match="config file does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override():
    with pytest.raises(BadInput, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.learning_rate"])
    with pytest.raises(BadInput, match="'experiment' is not a section"):
        apply_overrides({"experiment": "x"}, ["experiment.name=y"])


def test_stage_listed_twice():
    with pytest.raises(BadInput, match="listed twice"):
        validate_config({"experiment": "e", "stages": ["train", "train"]})


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.stages and cfg.experiment
