"""`align serve`: register deployments of the pipeline flows on a Prefect server and run them.

Deployments (each shows a Run form in the UI whose fields are the flow's parameters):

    align-pipeline/pipeline       any config: config_path, overrides, rounds, force, ...
    align-rounds/rounds           any config: add rounds after the experiment's last complete one
    align-pipeline/<experiment>   one per CONFIG given, its config_path filled in
    align-rounds/<experiment>     one per iterative CONFIG (online: it samples, or it has rounds > 1)
                                  and per CONFIG when a schedule is given; the schedule goes here

A scheduled run adds one round (`add_rounds=1`) and waits for a run of the same experiment that is
still going (`if_running=wait`), so rounds queue up instead of overlapping.
This process runs the flow runs itself, each in a subprocess (Prefect's Runner): no work pool.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import flows  # noqa: F401  (configures Prefect's environment first)
from stages.config import RunConfig, load_config
from stages.pipeline.errors import BadInput
from stages.pipeline.paths import PROJECT_ROOT
from stages.pipeline.runner import preflight

GENERIC = ("pipeline", "rounds")


@dataclass
class Schedule:
    cron: str | None = None
    interval_seconds: int | None = None

    def __post_init__(self):
        if self.cron and self.interval_seconds:
            raise BadInput("give --cron or --interval, not both")
        if self.interval_seconds is not None and self.interval_seconds < 1:
            raise BadInput(f"--interval: must be at least 1 second (got {self.interval_seconds})")
        if self.cron:
            from prefect.client.schemas.schedules import CronSchedule

            try:
                CronSchedule(cron=self.cron)
            except ValueError:
                raise BadInput(f"--cron {self.cron!r}: not a cron expression (e.g. '0 * * * *', every hour)") from None

    def __bool__(self) -> bool:
        return bool(self.cron or self.interval_seconds)

    def describe(self) -> str:
        return f"cron {self.cron}" if self.cron else f"every {self.interval_seconds} s"

    def to_deployment_kwargs(self) -> dict:
        if self.cron:
            return {"cron": self.cron}
        if self.interval_seconds:
            return {"interval": datetime.timedelta(seconds=self.interval_seconds)}
        return {}


def is_iterative(config: RunConfig) -> bool:
    """Online flows (round k samples from round k-1's policy) and configs with several rounds."""
    return "sample" in config.stages or config.rounds > 1


def shown_path(path: Path) -> str:
    """The config path as the Run form shows it: relative to the project when inside it."""
    full = path.expanduser().resolve()
    try:
        return str(full.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(full)


def build_deployments(configs: list[Path], artifacts: str | None = None, schedule: Schedule | None = None) -> list:
    """The RunnerDeployments to serve; every CONFIG is validated first (one-line BadInput)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import iterate, pipeline

    schedule = schedule or Schedule()
    defaults = {"artifacts": artifacts} if artifacts else {}
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["align"]}
    deployments = [
        pipeline.to_deployment("pipeline", parameters=defaults, **common,
                               description="Run any config: fill in config_path (e.g. configs/smoke.yaml)."),
        iterate.to_deployment("rounds", parameters=defaults, **common,
                              description="Add rounds to any experiment after its last complete round."),
    ]
    seen: set[str] = set(GENERIC)
    for path in configs:
        config = load_config(path)
        preflight(config, artifacts)  # the refs resolve under the root the deployments run against
        name = config.experiment
        if name in seen:
            raise BadInput(f"{path}: experiment {name} is deployed twice (give each config its own experiment)")
        seen.add(name)
        params = {**defaults, "config_path": shown_path(path)}
        # One run of an experiment's deployment at a time: the next waits in AwaitingConcurrencySlot
        # (a scheduled round behind a long one) instead of starting and blocking on the experiment's lock.
        one = {**common, "concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)}
        deployments.append(pipeline.to_deployment(name, parameters=params, **one,
                                                  description=f"{config.description or name}: {shown_path(path)}"))
        if is_iterative(config) or schedule:
            extra = schedule.to_deployment_kwargs()
            when = f"; scheduled {schedule.describe()}, one round per run" if schedule else ""
            deployments.append(iterate.to_deployment(name, parameters=params, **one, **extra,
                                                     description=f"add rounds to {name}{when}"))
    return deployments


def api_url(port: int) -> str:
    """PREFECT_API_URL, or `align server`'s default address on this port (set for this process)."""
    url = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = url
    return url.rstrip("/")


def check_server(url: str) -> None:
    import httpx

    try:
        ok = httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        ok = False
    if not ok:
        raise BadInput(f"no Prefect server answers at {url}: start one with `align server` "
                       f"(or point PREFECT_API_URL at yours)")


def serve(configs: list[Path], artifacts: str | None = None, schedule: Schedule | None = None,
          port: int = 4200, echo=print) -> None:
    """Validate, check the server, register the deployments and run their flow runs until Ctrl-C."""
    url = api_url(port)
    schedule = schedule or Schedule()
    deployments = build_deployments(configs, artifacts, schedule)  # validates before touching the server
    check_server(url)
    from prefect import serve as prefect_serve

    ui = url[:-4] if url.endswith("/api") else url
    echo(f"serving {len(deployments)} deployments on {ui}/deployments (Ctrl-C stops):")
    for d in deployments:
        flow_name = "align-rounds" if d.entrypoint.endswith(".iterate") else "align-pipeline"
        when = f"  [{schedule.describe()}]" if d.schedules else ""
        echo(f"  {flow_name}/{d.name}{when}")
    prefect_serve(*deployments, print_starting_message=False)


# -- `align deploy`: the same deployments on Prefect work pools, run by `prefect worker start` -------

def ensure_pool(client, name: str) -> None:
    """Create a process work pool called `name` unless one exists (workers on any machine poll it)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(name)
    except ObjectNotFound:
        template = ProcessWorker.get_default_base_job_template()
        client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))


CRASH_AUTOMATION = "align: crash flow runs whose heartbeat stopped"


def ensure_crash_detection(heartbeat: int) -> None:
    """The automation that marks an align flow run Crashed when its heartbeats stop for three
    periods: a worker (or its machine) killed mid-stage reports nothing, and without this the UI
    would show the run Running for ever and the parent run would wait on its subflow for ever.
    Prefect's recipe (docs: detect zombie flows), kept to flow runs tagged `align`."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        match_related=ResourceSpecification({"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.align"}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=3 * heartbeat))
    action = ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"no heartbeat for {3 * heartbeat} s: its worker or machine died")
    try:
        existing = Automation.read(name=CRASH_AUTOMATION)
    except ValueError:
        existing = None
    if existing is None:
        Automation(name=CRASH_AUTOMATION, trigger=trigger, actions=[action]).create()
    elif existing.trigger != trigger or existing.actions != [action]:
        existing.trigger, existing.actions = trigger, [action]
        existing.update()


def deploy(configs: list[Path], pool: str, artifacts: str | None = None, schedule: Schedule | None = None,
           port: int = 4200, heartbeat: int = 30, echo=print) -> list[str]:
    """Register the pipeline deployments on `pool` and an `align-stage/<pool>` deployment for every
    pool the configs place stages on (RunConfig.pools); returns the deployments' names."""
    from prefect import deploy as prefect_deploy
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import STAGE_FLOW, stage_flow

    import re

    from stages.config import NAME

    if not re.fullmatch(NAME, pool):
        raise BadInput(f"--pool {pool!r}: not a work pool name (letters, digits, . _ -)")
    if heartbeat < 30:
        raise BadInput(f"--heartbeat {heartbeat}: must be at least 30 seconds (Prefect's minimum)")
    url = api_url(port)
    deployments = build_deployments(configs, artifacts, schedule or Schedule())
    placed = sorted({p for path in configs for p in load_config(path).pools.values()})
    check_server(url)
    with get_client(sync_client=True) as client:
        for name in sorted({pool, *placed}):
            ensure_pool(client, name)
    ensure_crash_detection(heartbeat)
    # The flow runs a worker starts get the heartbeat the automation expects.
    job_variables = {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat)}}
    for d in deployments:
        d.job_variables = job_variables
    common = {"print_next_steps_message": False, "build": False, "push": False, "ignore_warnings": True}
    prefect_deploy(*deployments, work_pool_name=pool, **common)
    names = [f"{'align-rounds' if d.entrypoint.endswith('.iterate') else 'align-pipeline'}/{d.name}" for d in deployments]
    for name in placed:
        d = stage_flow.to_deployment(name, entrypoint_type=EntrypointType.MODULE_PATH, tags=["align"],
                                     job_variables=job_variables, description=f"the stages that configs place on work pool {name}")
        prefect_deploy(d, work_pool_name=name, **common)
        names.append(f"{STAGE_FLOW}/{name}")
    echo(f"deployed on {url[:-4] if url.endswith('/api') else url}: " + ", ".join(names))
    echo(f"start workers with: prefect worker start --pool {pool}"
         + "".join(f"; prefect worker start --pool {p}" for p in placed if p != pool))
    return names
