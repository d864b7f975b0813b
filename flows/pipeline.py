"""The Prefect flows that run a config's stages in order, one Prefect task per stage.

Each task calls the same runner the CLI and tests use; the runner's manifests decide what is
complete, so a re-run skips finished stages (their task runs end in a Completed state named
Skipped) and a retried run resumes at the failed stage. Tasks return small JSON summaries
(persisted as JSON: nothing is pickled), never models or tables.

Two flows share one body:
- `align-pipeline` (`pipeline`) runs the config's rounds, or `rounds` of them;
- `align-rounds` (`iterate`) adds `add_rounds` rounds after the experiment's last complete round:
  what a schedule runs, so each scheduled run trains one more round of an online flow.

Both hold the experiment's lock (stages/pipeline/lock.py) while they run, and both show tables, the
round's metrics, a reward histogram and sample generations as artifacts (flows/ui_artifacts.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Iterator, Literal, Optional

import flows  # noqa: F401  (configures Prefect's environment before it is imported)
from prefect import flow, task
from pydantic import Field, WithJsonSchema
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.states import Completed, Failed, State

from flows import ui_artifacts
from stages.config import RunConfig
from stages.pipeline.errors import BadInput, is_transient
from stages.pipeline.lock import experiment_lock
from stages.pipeline.plan import Plan, plan_run
from stages.pipeline.runner import StageResult, report_round, run_stage, stages_of_round
from stages.pipeline.store import ArtifactStore

logging.getLogger("align").setLevel(logging.INFO)  # Prefect attaches its handlers (PREFECT_LOGGING_EXTRA_LOGGERS)

SKIPPED = "Skipped"  # the name of the Completed state of a stage whose complete artifact was reused

# Optional parameters that the UI's Run form shows as plain fields prefilled with an empty value (an
# Optional[...] shows as a "type or None" switch, and a None default fails the form's validation);
# in Python None still means "not given", which is what the CLI passes.
Text = Annotated[Optional[str], WithJsonSchema({"type": "string"}), Field(json_schema_extra={"default": ""})]
Texts = Annotated[Optional[list[str]], WithJsonSchema({"type": "array", "items": {"type": "string"}}),
                  Field(json_schema_extra={"default": []})]
Count = Annotated[Optional[int], WithJsonSchema({"type": "integer", "minimum": 0}),
                  Field(json_schema_extra={"default": 0})]


@contextlib.contextmanager
def injected_fault(stage: str | None) -> Iterator[None]:
    """Make the runner's test hook (ALIGN_INJECT_FAULT) fail `stage` for the duration of the block."""
    if not stage:
        yield
        return
    before = os.environ.get("ALIGN_INJECT_FAULT")
    os.environ["ALIGN_INJECT_FAULT"] = ",".join(filter(None, [before, f"{stage}:fail"]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ALIGN_INJECT_FAULT", None)
        else:
            os.environ["ALIGN_INJECT_FAULT"] = before


def skipped_state(result: dict) -> Completed:
    where = f"{result['stage']} (round {result['round']})"
    return Completed(name=SKIPPED, data=result, message=f"{where}: complete artifact {result['fingerprint']} reused")


def transient_failure(task, task_run, state) -> bool:
    """Prefect's retry condition for a stage: only the network's and the store's errors (a dropped
    connection, a timeout, S3 throttling) are worth another try; the stage resumes from its scratch
    folder. A bad input or a bug fails at once."""
    return isinstance(state.data, BaseException) and is_transient(state.data)


# Two more tries, 10 s and 60 s later, for transient failures only.
STAGE_RETRIES = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": transient_failure}


# No Prefect cache: the runner's manifests are the skip check (Prefect's input cache would miss an
# edited or deleted artifact). Results are still persisted, as JSON, which is what Retry needs.
@task(persist_result=True, result_serializer="json", log_prints=True, cache_policy=NO_CACHE, **STAGE_RETRIES)
def stage_task(cfg: RunConfig, stage: str, round_: int, artifacts: str, force: bool = False, fail: bool = False,
               pool: str | None = None):
    """One stage through the runner; `fail` injects a fault (the `fail_once` test hook). The config
    comes validated by `plan_run`, once for the whole flow run."""
    with injected_fault(stage if fail else None):
        result = run_stage(cfg, stage, round_, ArtifactStore(artifacts), force=force, where={"pool": pool}).to_dict()
    ui_artifacts.stage_artifact(cfg.experiment, result)
    return skipped_state(result) if result["status"] == "skipped" else result


def run_stage_task(cfg: RunConfig, stage: str, round_: int, artifacts: str, force: bool, fail: bool,
                   pool: str | None) -> dict:
    """stage_task as a task run named after the stage and round; its result dict."""
    run = stage_task.with_options(name=stage, task_run_name=f"{stage} (round {round_})")
    result = run(cfg, stage, round_, artifacts, force, fail, pool)
    return result.result() if isinstance(result, State) else result  # Skipped: a State


def complete_rounds(config: RunConfig, store: ArtifactStore) -> int:
    """How many rounds, from round 0 on, have a complete artifact for every stage."""
    k = 0
    while all(store.read_manifest(store.stage_dir(config.experiment, k, s)) is not None
              for s in stages_of_round(config, k)):
        k += 1
    return k


def rounds_to_run(config: RunConfig, store: ArtifactStore, add_rounds: int = 0) -> int:
    """The number of rounds this run covers: the config's, or the complete ones plus `add_rounds`."""
    return complete_rounds(config, store) + add_rounds if add_rounds else config.rounds


# -- the attempt: first run, or a Retry of a failed run ---------------------------------------------

@dataclass
class Attempt:
    number: int = 1  # Prefect's run count: 2 and more is a Retry
    started: datetime | None = None  # when the flow run first started (kept across retries)
    from_deployment: bool = False
    pool: str | None = None  # the work pool whose worker runs this flow run

    @property
    def retry(self) -> bool:
        return self.number > 1


def current_attempt() -> Attempt:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return Attempt()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the context's copy predates the Running state
        run = client.read_flow_run(ctx.flow_run.id)
    return Attempt(max(1, run.run_count), run.start_time, run.deployment_id is not None, run.work_pool_name)


def written_since(store: ArtifactStore, config: RunConfig, round_: int, stage: str, since: datetime | None) -> bool:
    """Did this flow run (an earlier attempt of it) write the stage's complete artifact?"""
    manifest = store.read_manifest(store.stage_dir(config.experiment, round_, stage))
    if since is None or manifest is None:
        return False
    return datetime.fromisoformat(manifest["started"]) >= since.replace(microsecond=0)


def mark_orphans_crashed(experiment: str, logger) -> None:
    """Tag this flow run with its experiment, and mark the experiment's other runs that are still
    RUNNING as Crashed: this run holds the experiment's lock, so they were killed (a SIGKILL leaves
    no process to report it, and the UI would show them running for ever)."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                FlowRunFilterTags)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    tag = f"experiment:{experiment}"
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, tags=sorted({*(ctx.flow_run.tags or []), tag}))
        stale = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[tag]), state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
        for run in stale:
            if run.id == ctx.flow_run.id or run.parent_task_run_id is not None:
                continue
            client.set_flow_run_state(run.id, Crashed(message=f"found still running by flow run {ctx.flow_run.name}, "
                                                               f"which holds experiment {experiment}: it was killed"),
                                      force=True)
            logger.info("experiment %s: flow run %s was left running by a killed process; marked Crashed",
                        experiment, run.name)


# -- the flows --------------------------------------------------------------------------------------

QUIET = "ALIGN_QUIET_CONSOLE"  # set by `align run` (without --debug)


class _OneLineConsole(logging.Filter):
    """No tracebacks; with `drop_refused`, no repeats of a refused input either (`align run`
    prints it once, last)."""

    def __init__(self, drop_refused: bool):
        super().__init__()
        self.drop_refused = drop_refused

    def filter(self, record):
        record.exc_info, record.exc_text = None, None
        return not (self.drop_refused and "BadInput" in record.getMessage())


def quiet_console(drop_refused: bool) -> None:
    """Filter the console handlers (Prefect's sits on the root logger once a run has started; the
    API handlers are left alone, so the UI's run log keeps every line)."""
    names = ["", "align", *(n for n in list(logging.root.manager.loggerDict) if n == "prefect" or n.startswith("prefect."))]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(isinstance(f, _OneLineConsole) for f in handler.filters):
                handler.addFilter(_OneLineConsole(drop_refused))


def execute(config_path: str, overrides: list[str] | None, artifacts: str | None, experiment: str | None,
            force: list[str] | None, rounds: int | None, add_rounds: int, fail_once: str | None,
            if_running: str) -> list[dict] | Failed:
    logger = get_run_logger() if FlowRunContext.get() else logging.getLogger("align")
    if os.environ.get(QUIET) == "1":
        quiet_console(drop_refused=True)
    attempt = current_attempt()
    try:
        plan = plan_run(config_path, overrides, artifacts, experiment, force, rounds, add_rounds, fail_once)
        cfg, store = plan.config, ArtifactStore(plan.root)
        with experiment_lock(plan.root, cfg.experiment, wait=if_running == "wait"):
            mark_orphans_crashed(cfg.experiment, logger)
            total = rounds_to_run(cfg, store, add_rounds)
            if add_rounds:
                done = total - add_rounds
                logger.info("experiment %s: %d complete round%s; this run goes to round %d",
                            cfg.experiment, done, "" if done == 1 else "s", total - 1)
            if attempt.retry:
                logger.info("retry %d: complete stages are skipped; the failed stage and what follows run",
                            attempt.number - 1)
            results = run_rounds(plan, store, total, attempt)
    except BadInput as e:
        if not attempt.from_deployment:
            raise  # `align run` prints it as its one-line error and exits 2
        logger.error("align: error: %s", e)
        return Failed(message=f"align: error: {e}")  # the UI shows this line as the run's state message
    ran = [f"{r['stage']}@{r['round']}" for r in results if r["status"] == "ran"]
    skipped = [f"{r['stage']}@{r['round']}" for r in results if r["status"] == "skipped"]
    logger.info("experiment %s: ran %s; skipped %s", cfg.experiment, ", ".join(ran) or "nothing",
                ", ".join(skipped) or "nothing")
    return results


def run_rounds(plan: Plan, store: ArtifactStore, total: int, attempt: Attempt) -> list[dict]:
    cfg = plan.config
    results, failed = [], None
    try:
        for k in range(total):
            for stage in stages_of_round(cfg, k):
                failed = (stage, k)
                # --force re-runs a stage once per flow run: a Retry keeps what the first attempt re-ran.
                redone = attempt.retry and written_since(store, cfg, k, stage, attempt.started)
                force = stage in plan.forced and not redone
                fail = stage == plan.fail_once and not attempt.retry
                pool = cfg.pools.get(stage) if attempt.from_deployment else None
                if pool:
                    results.append(run_on_pool(pool, cfg, stage, k, plan.root, force, fail, store))
                else:
                    results.append(run_stage_task(cfg, stage, k, plan.root, force, fail, attempt.pool))
                failed = None
            report_round(store, cfg, k)
            ui_artifacts.round_artifacts(store, cfg.experiment, k, stages_of_round(cfg, k), cfg.evaluate.samples_to_show)
    finally:
        ui_artifacts.run_artifact(cfg.experiment, results, failed)
    return results


# -- stages placed on work pools (RunConfig.pools, deployed by `align deploy`) -------------------------

STAGE_FLOW = "align-stage"


def run_on_pool(pool: str, cfg: RunConfig, stage: str, round_: int, artifacts: str, force: bool, fail: bool,
                store: ArtifactStore) -> dict:
    """Run one stage as a subflow on a worker of `pool` (the deployment align-stage/<pool>) and wait.
    The result comes from the artifact's manifest in the shared store, not from Prefect's result
    storage, which is local to the machine that ran it."""
    from prefect.deployments import run_deployment

    dest = store.stage_dir(cfg.experiment, round_, stage)
    before = (store.read_manifest(dest) or {}).get("run_id")
    run = run_deployment(f"{STAGE_FLOW}/{pool}", timeout=None, poll_interval=1, as_subflow=True,
                         flow_run_name=f"{stage} (round {round_}) on {pool}",
                         parameters={"config": cfg.model_dump(mode="json"), "stage": stage, "round_": round_,
                                     "artifacts": artifacts, "force": force, "fail": fail, "pool": pool})
    if not run.state or not run.state.is_completed():
        state = run.state.type.value if run.state else "no state"
        message = (run.state.message if run.state else "") or "see its flow run"
        raise RuntimeError(f"{stage} (round {round_}) on pool {pool}: {state}: {message}")
    manifest = store.read_manifest(dest)
    if manifest is None:
        raise RuntimeError(f"{stage} (round {round_}) on pool {pool} completed but left no complete artifact at {dest}")
    status = "skipped" if manifest["run_id"] == before else "ran"
    return StageResult(stage, round_, status, manifest["fingerprint"], manifest["rows"], dest,
                       manifest.get("wall_seconds", 0.0), f"on pool {pool}", manifest.get("metrics", {}),
                       manifest.get("peak_rss_gb")).to_dict()


@flow(name=STAGE_FLOW, log_prints=True, persist_result=True, result_serializer="json")
def stage_flow(config: dict, stage: str, round_: int, artifacts: str, force: bool = False, fail: bool = False,
               pool: str = "") -> dict:
    """One stage of a pipeline run, on a worker of the pool this deployment belongs to (the parent
    run holds the experiment's lock and passes its validated config)."""
    return run_stage_task(RunConfig.model_validate(config), stage, round_, artifacts, force, fail, pool or None)


@flow(name="align-pipeline", log_prints=True, persist_result=True, result_serializer="json")
def pipeline(config_path: str, overrides: Texts = None, artifacts: Text = None, experiment: Text = None,
             force: Texts = None, rounds: Count = None, fail_once: Text = None,
             if_running: Literal["refuse", "wait"] = "refuse") -> list[dict]:
    """Run every round and stage of a config; complete stages are skipped and shown as Skipped.

    Args:
        config_path: YAML run configuration, e.g. configs/smoke.yaml (relative paths are also looked up in the project).
        overrides: Config overrides, one KEY=VALUE per item, the value parsed as YAML (align run --set), e.g.
            train.epochs=1.
        artifacts: Artifact root (a folder or any fsspec URL); empty means ALIGN_ARTIFACTS or ./artifacts.
        experiment: Experiment name; empty means the config's.
        force: Stages to re-run with everything downstream even if complete (align run --force), e.g. train.
        rounds: How many rounds to run; 0 means the config's rounds.
        fail_once: Test hook: this stage fails on the run's first attempt, so that Retry can be tried.
        if_running: When another run holds this experiment: refuse (fail at once with a message) or wait for it.
    """
    return execute(config_path, overrides, artifacts, experiment, force, rounds, 0, fail_once, if_running)


@flow(name="align-rounds", log_prints=True, persist_result=True, result_serializer="json")
def iterate(config_path: str, overrides: Texts = None, artifacts: Text = None, experiment: Text = None,
            force: Texts = None, add_rounds: int = 1, fail_once: Text = None,
            if_running: Literal["refuse", "wait"] = "wait") -> list[dict]:
    """Add rounds to an online experiment: continue after its last complete round (scheduled runs add one each).

    Args:
        config_path: YAML run configuration of an online flow, e.g. configs/online_dpo_movies.yaml.
        overrides: Config overrides, one KEY=VALUE per item, the value parsed as YAML (align run --set).
        artifacts: Artifact root (a folder or any fsspec URL); empty means ALIGN_ARTIFACTS or ./artifacts.
        experiment: Experiment name; empty means the config's.
        force: Stages to re-run with everything downstream even if complete (align run --force).
        add_rounds: Rounds to add after the last complete one (an incomplete round is finished first); 0 runs the
            config's rounds.
        fail_once: Test hook: this stage fails on the run's first attempt, so that Retry can be tried.
        if_running: When another run holds this experiment: wait for it (scheduled rounds queue up) or refuse.
    """
    return execute(config_path, overrides, artifacts, experiment, force, None, add_rounds, fail_once, if_running)
