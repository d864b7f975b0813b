"""Run configurations: YAML validated by pydantic, with `--set a.b=value` overrides.

Every section forbids unknown keys, so a typo is an error that names its key path instead of a
setting silently ignored. Defaults sit here, at the top of each section, where a reader finds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stages.errors import BadInput


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoadPromptsConfig(Section):
    # A built-in corpus ("movie_snippets", "tweets", "product_snippets", "editorial_snippets"),
    # a local/fsspec Parquet, JSONL or CSV file, or a hub dataset name (only where the hub is reachable).
    source: str = "movie_snippets"
    hub_split: str = "train"
    # our column -> the source's column; `prompt` is required, `completion` and `score` optional.
    columns: dict[str, str] = Field(default_factory=dict)
    # For the built-in snippet corpora: prompt = the first N words, completion = the rest.
    # None keeps the whole text as the prompt (reward modelling on whole snippets).
    prompt_words: int | None = 6
    min_abs_score: float | None = None  # keep rows with |score| >= this (drops neutral snippets)
    min_prompt_chars: int = 1
    max_prompt_chars: int = 2000
    min_completion_words: int = 0
    dedupe: Literal["prompt", "row", "none"] = "prompt"
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_rows: int | None = Field(None, gt=0)  # applied after the split, per split, in hash order


class BuildPoolConfig(Section):
    # sft: prompt -> completion records; reward_pairs: pairs of texts whose scores differ.
    kind: Literal["sft", "reward_pairs"] = "sft"
    min_score_gap: float = 1.0
    max_records: int | None = Field(None, gt=0)  # per split
    heldout_max_records: int | None = Field(None, gt=0)


class TrainConfig(Section):
    objective: Literal["sft", "reward"] = "sft"
    # "smollm2", "minilm", "tiny-llama", a local model folder, or a hub id (online only).
    model: str = "smollm2"
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, gt=0)  # caps the optimizer steps
    batch_size: int = Field(4, ge=1)  # records per micro-batch (a pair counts as one record)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(128, ge=8)  # tokens, prompt + completion
    max_prompt_length: int = Field(64, ge=1)
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpoint_every: int = Field(50, ge=1)  # optimizer steps between resumable checkpoints
    margin: float = 0.0  # reward objective: -log sigmoid(s_c - s_r - margin)


class EvaluateConfig(Section):
    batch_size: int = Field(8, ge=1)
    max_records: int | None = Field(200, gt=0)
    samples_to_show: int = Field(5, ge=0)


StageName = Literal["load_prompts", "build_pool", "train", "evaluate"]


class RunConfig(Section):
    experiment: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    seed: int = 0
    stages: list[StageName] = Field(default_factory=lambda: ["load_prompts", "build_pool", "train", "evaluate"])
    load_prompts: LoadPromptsConfig = Field(default_factory=LoadPromptsConfig)
    build_pool: BuildPoolConfig = Field(default_factory=BuildPoolConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("stages")
    @classmethod
    def _no_repeats(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError("a stage is listed twice")
        return stages

    def section(self, stage: str) -> Section:
        return getattr(self, stage)


def _error_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{path}'"
    if kind == "missing":
        return f"{source}: missing required key '{path}'"
    return f"{source}: bad value for '{path}': {first['msg']} (got {first.get('input')!r})"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (so 3 is int, [a, b] a list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set {item!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise BadInput(f"--set {item!r}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, experiment: str | None = None) -> RunConfig:
    """Read, override and validate a YAML run configuration; every error is one BadInput line."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"config file does not exist: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise BadInput(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a mapping of sections at the top level")
    data = apply_overrides(data, overrides or [])
    if experiment:
        data["experiment"] = experiment
    data.setdefault("experiment", path.stem)
    return validate_config(data, str(path))


def validate_config(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise BadInput(_error_line(e, source)) from None
