"""The one runner that does every stage's bookkeeping.

For a stage in a round it:
  1. computes the fingerprint = hash(stage name, code version, config section, seed, the inputs'
     fingerprints, and the identity of outside inputs such as a data file);
  2. skips when a complete artifact with that fingerprint exists, its checksums verify and its
     inputs are the very artifacts that exist now (an upstream re-run makes it stale);
  3. otherwise runs the stage function into a fresh folder, writes the manifest last and renames
     the folder into place; a failure leaves nothing behind.

The CLI, the tests and the Prefect tasks all call `run_stage`; stages never do bookkeeping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow.parquet as pq

from stages.config import RunConfig
from stages.pipeline.context import StageContext, StageOutput, Upstream
from stages.pipeline.errors import BadInput
from stages.pipeline.refs import resolve_refs
from stages.pipeline.provenance import provenance
from stages.pipeline.registry import downstream_of, input_rounds, parse_input, stage_specs
from stages.pipeline.seeds import seed_everything
from stages.pipeline.store import DATA, ArtifactStore
from stages.training.allocator import (keep_long_lived_objects_out_of_gc, peak_rss_gb, release_free_memory,
                                      reset_peak_rss, return_freed_pages_sooner)

log = logging.getLogger("align")


@dataclass
class StageResult:
    """A small JSON-able summary (this is what Prefect tasks return and persist)."""

    stage: str
    round: int
    status: str  # "ran" or "skipped"
    fingerprint: str
    rows: int
    path: str
    wall_seconds: float
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    peak_rss_gb: float | None = None  # the manifest's: the process's peak resident memory while it ran

    def to_dict(self) -> dict:
        return asdict(self)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fingerprint(payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def inject_fault(stage: str) -> None:
    """Test hook: ALIGN_INJECT_FAULT="train:fail" raises, "train:hang" blocks (to be killed)."""
    for item in filter(None, os.environ.get("ALIGN_INJECT_FAULT", "").split(",")):
        name, _, mode = item.partition(":")
        if name != stage:
            continue
        if mode == "hang":
            log.info("%s: injected hang", stage)
            while True:
                time.sleep(1)
        raise RuntimeError(f"injected fault in stage {stage}")


def resolve_inputs(config: RunConfig, stage: str, round_: int, store: ArtifactStore) -> dict[str, Upstream]:
    inputs = {}
    for ref in stage_specs()[stage].inputs:
        name, when = parse_input(ref)
        if name not in config.stages:
            continue
        for k in input_rounds(when, round_):
            if name == stage and k >= round_:  # a stage's own "name@0" is round 0's from round 1 on
                continue
            path = store.stage_dir(config.experiment, k, name)
            manifest = store.read_manifest(path)
            problem = "no complete artifact" if manifest is None else store.verify(path, manifest)
            if problem:
                raise BadInput(f"stage {stage} needs {name} (round {k}) at {path}: {problem}; run {name} first")
            # "name@earlier" gives one input per round, keyed "name@k"
            inputs[f"{name}@{k}" if when == "earlier" else name] = Upstream(name, path, manifest, store)
    return inputs


def stage_fingerprint(config: RunConfig, stage: str, inputs: dict[str, Upstream]) -> tuple[str, dict]:
    spec = stage_specs()[stage]
    section = config.section(stage)
    payload = {
        "stage": stage,
        "version": spec.version,
        "config": section.model_dump(mode="json"),
        "seed": config.seed,
        "inputs": {n: u.manifest["fingerprint"] for n, u in sorted(inputs.items())},
        "identity": spec.identity(section) if spec.identity else {},
    }
    return fingerprint(payload), payload


def why_stale(store: ArtifactStore, path: str, manifest: dict | None, fp: str, inputs: dict[str, Upstream]) -> str | None:
    """None when the existing artifact can be reused; otherwise the reason it cannot."""
    if manifest is None:
        return "no complete artifact"
    if manifest.get("fingerprint") != fp:
        return "config, code or inputs changed"
    recorded = manifest.get("inputs", {})
    for name, up in inputs.items():
        if recorded.get(name, {}).get("run_id") != up.manifest.get("run_id"):
            return f"input {name} was re-run"
    return store.verify(path, manifest)


def placement(where: dict | None = None) -> dict:
    """Where a stage runs, for its manifest: the host and process, and the Prefect worker (which
    sets PREFECT__WORKER_NAME for its flow runs) and work pool when it runs under one."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": os.environ.get("PREFECT__WORKER_NAME"),
            "pool": None, **(where or {})}


def run_stage(config: RunConfig, stage: str, round_: int, store: ArtifactStore, force: bool = False,
              where: dict | None = None) -> StageResult:
    specs = stage_specs()
    if stage not in specs:
        raise BadInput(f"unknown stage '{stage}' (known: {', '.join(specs)})")
    spec = specs[stage]
    return_freed_pages_sooner()  # once per process: see allocator.DECAY_MS
    keep_long_lived_objects_out_of_gc()  # once per process, before any stage's objects exist
    config = with_refs_resolved(config, [stage], store)  # other experiments' artifacts, under this run's root
    section = config.section(stage)
    inputs = resolve_inputs(config, stage, round_, store)
    fp, payload = stage_fingerprint(config, stage, inputs)
    dest = store.stage_dir(config.experiment, round_, stage)
    existing = store.read_manifest(dest)
    reason = "forced" if force else why_stale(store, dest, existing, fp, inputs)
    if reason is None:
        log.info("%s (round %d): skipped, complete artifact %s", stage, round_, fp)
        return StageResult(stage, round_, "skipped", fp, existing["rows"], dest, 0.0, "up to date", existing.get("metrics", {}),
                           existing.get("peak_rss_gb"))

    log.info("%s (round %d): running (%s)", stage, round_, reason)
    workdir = store.new_workdir()
    started, t0 = _now(), time.perf_counter()
    try:
        resume_dir = store.resume_dir(config.experiment, round_, stage, fp)
        for stale in store.sweep_resume(resume_dir):
            log.info("%s (round %d): removed the resume folder of an earlier configuration: %s", stage, round_, stale)
        ctx = StageContext(stage, config.experiment, round_, config.seed, workdir, resume_dir, inputs, log,
                           payload["identity"])
        inject_fault(stage)
        seed_everything(ctx.round_seed)
        reset_peak_rss()
        out = spec.fn(ctx, section)
        peak = peak_rss_gb()
        if not isinstance(out, StageOutput):
            raise TypeError(f"stage {stage} returned {type(out).__name__}, expected StageOutput")
        pq.write_table(out.table, workdir / DATA)
        wall = time.perf_counter() - t0
        manifest = {
            "stage": stage,
            "experiment": config.experiment,
            "round": round_,
            "fingerprint": fp,
            "run_id": uuid.uuid4().hex,
            "code_version": spec.version,
            "inputs": {n: {"fingerprint": u.manifest["fingerprint"], "run_id": u.manifest["run_id"], "path": u.path}
                       for n, u in inputs.items()},
            "config": payload["config"],
            "seed": config.seed,
            "identity": payload["identity"],
            "rows": out.table.num_rows,
            "schema": [{"name": f.name, "type": str(f.type)} for f in out.table.schema],
            "started": started,
            "finished": _now(),
            "wall_seconds": round(wall, 3),
            # The process's peak resident memory while the stage ran (stages that run at once in one
            # process share it; a multi-process train stage's workers are not in it); None off Linux.
            "peak_rss_gb": round(peak, 3) if peak is not None else None,
            "ran_on": placement(where),
            "provenance": provenance(),
            "metrics": out.metrics,
        }
        store.commit(workdir, dest, manifest)
        store.drop_resume(resume_dir)
        release_free_memory()  # the next stage of the round starts on what this one freed
    except BaseException:
        store.discard(workdir)
        raise
    log.info("%s (round %d): wrote %d rows in %.1fs -> %s", stage, round_, out.table.num_rows, wall, dest)
    return StageResult(stage, round_, "ran", fp, out.table.num_rows, dest, round(wall, 3), reason, out.metrics,
                       manifest["peak_rss_gb"])


def with_refs_resolved(config: RunConfig, stages: list[str], store: ArtifactStore) -> RunConfig:
    """The config with the references in these stages' sections located under the store's root."""
    return config.model_copy(update={s: resolve_refs(config.section(s), store, s) for s in stages})


def preflight(config: RunConfig, root: str | None = None) -> None:
    """Check every stage's outside inputs (data files, model paths, other experiments' artifacts
    under `root`, default the artifact root) before anything runs or is written."""
    from stages.pipeline.paths import default_artifact_root

    config = with_refs_resolved(config, config.stages, ArtifactStore(root or default_artifact_root()))
    specs = stage_specs()
    for stage in config.stages:
        if specs[stage].identity:
            specs[stage].identity(config.section(stage))


def forced_stages(config: RunConfig, force: list[str]) -> set[str]:
    """The stages named by --force and everything downstream of them in this flow."""
    unknown = [s for s in force if s not in config.stages]
    if unknown:
        raise BadInput(f"--force {unknown[0]}: not a stage of this flow (stages: {', '.join(config.stages)})")
    return {s for name in force for s in downstream_of(name, config.stages)}


def stages_of_round(config: RunConfig, round_: int) -> list[str]:
    """The flow's stages in a round: stages that run once (load_prompts) only in round 0."""
    specs = stage_specs()
    return [s for s in config.stages if round_ == 0 or not specs[s].once]


def run_flow_locally(config: RunConfig, store: ArtifactStore, force: list[str] | None = None,
                     rounds: int | None = None) -> list[StageResult]:
    """All rounds and stages in order without Prefect (tests and `align run --no-prefect`)."""
    forced = forced_stages(config, force or [])
    results = []
    for k in range(rounds or config.rounds):
        results += [run_stage(config, s, k, store, force=s in forced) for s in stages_of_round(config, k)]
        report_round(store, config, k)
    return results


def report_round(store: ArtifactStore, config: RunConfig, round_: int) -> None:
    """The round's report (stages/pipeline/report.py), once its evaluate is complete. A report that
    cannot be drawn is logged, never a failed run: the artifacts it reads are all there."""
    if "evaluate" not in config.stages:
        return
    from stages.pipeline.report import write_round_report

    try:
        path = write_round_report(store, config.experiment, round_)
        log.info("report (round %d): %s", round_, path)
    except Exception as e:  # noqa: BLE001
        log.warning("report (round %d) not written: %s: %s", round_, type(e).__name__, e)
