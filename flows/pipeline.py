"""The Prefect flow that runs a config's stages in order, one Prefect task per stage.

Each task calls the same runner the CLI and tests use; the runner's manifests decide what is
complete, so a re-run skips finished stages and a retried run resumes at the failed one. Tasks
return small JSON summaries (persisted as JSON: nothing is pickled), never models or tables.
"""

from __future__ import annotations

import flows  # noqa: F401  (configures Prefect's environment before it is imported)
from prefect import flow, task
from prefect.logging import get_run_logger

import logging

from stages.config import load_config, validate_config
from stages.paths import default_artifact_root
from stages.runner import forced_stages, preflight, run_stage, stages_of_round
from stages.store import ArtifactStore


logging.getLogger("align").setLevel(logging.INFO)  # Prefect attaches its handlers (PREFECT_LOGGING_EXTRA_LOGGERS)


@task(persist_result=True, result_serializer="json", log_prints=True)
def stage_task(config: dict, stage: str, round_: int, artifacts: str, force: bool = False) -> dict:
    result = run_stage(validate_config(config), stage, round_, ArtifactStore(artifacts), force=force)
    return result.to_dict()


@flow(name="align-pipeline", log_prints=True, persist_result=True, result_serializer="json")
def pipeline(config_path: str, overrides: list[str] | None = None, artifacts: str | None = None,
             experiment: str | None = None, force: list[str] | None = None) -> list[dict]:
    """Run every round and stage of CONFIG (a YAML file); complete stages are skipped."""
    logger = get_run_logger()
    config = load_config(config_path, overrides or [], experiment)
    preflight(config)
    root = artifacts or default_artifact_root()
    forced = forced_stages(config, force or [])
    results = []
    for k in range(config.rounds):
        for stage in stages_of_round(config, k):
            run = stage_task.with_options(name=stage, task_run_name=f"{stage} (round {k})")
            results.append(run(config.model_dump(mode="json"), stage, k, root, stage in forced))
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    logger.info("experiment %s: ran %s; skipped %s", config.experiment, ", ".join(ran) or "nothing",
                ", ".join(r["stage"] for r in results if r["status"] == "skipped") or "nothing")
    return results
