"""A run's parameters checked in one place before anything runs or is written: the config file
(composed, overridden, validated), its referenced artifacts, forced stages, rounds and the test
hook. `align run` (with or without Prefect) and the Prefect flows (started from the CLI, the UI or a
schedule) all call `plan_run`; stages then get the validated config as it is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.config import RunConfig, load_config
from stages.pipeline.errors import BadInput
from stages.pipeline.paths import PROJECT_ROOT, default_artifact_root
from stages.pipeline.store import ArtifactStore
from stages.pipeline.runner import forced_stages, preflight


@dataclass
class Plan:
    config: RunConfig
    root: str
    forced: set[str]
    fail_once: str | None


def resolve_config_path(config_path: str) -> Path:
    """As given; a relative path that is not there is also looked up in the project (configs/...)."""
    path = Path(config_path).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return PROJECT_ROOT / path
    return path


def plan_run(config_path: str, overrides: list[str] | None = None, artifacts: str | None = None,
             experiment: str | None = None, force: list[str] | None = None, rounds: int | None = None,
             add_rounds: int = 0, fail_once: str | None = None) -> Plan:
    """Validate every parameter before anything runs or is written; each error is one BadInput line."""
    if not config_path or not str(config_path).strip():
        raise BadInput("config_path: give a YAML run configuration, e.g. configs/smoke.yaml")
    if rounds is not None and rounds < 0:
        raise BadInput(f"rounds: must be at least 1 (got {rounds}; 0 means the config's)")
    rounds = rounds or None
    if add_rounds < 0:
        raise BadInput(f"add_rounds: must be 0 or more (got {add_rounds})")
    if rounds is not None and add_rounds:
        raise BadInput("give rounds or add_rounds, not both")
    overrides = [o for o in (overrides or []) if o.strip()]
    if rounds is not None:
        overrides.append(f"rounds={rounds}")
    config = load_config(resolve_config_path(config_path), overrides, experiment or None)
    ArtifactStore(artifacts or default_artifact_root()).check_writable()
    preflight(config, artifacts or default_artifact_root())
    forced = forced_stages(config, [s for s in (force or []) if s])
    fail_once = fail_once or None
    if fail_once and fail_once not in config.stages:
        raise BadInput(f"fail_once {fail_once}: not a stage of this flow (stages: {', '.join(config.stages)})")
    return Plan(config, artifacts or default_artifact_root(), forced, fail_once)
