"""The serve layer without a server or a browser: the experiment lock, adding rounds, the Skipped
state, one-line errors for bad parameters, deployments and schedules, and the UI's artifacts."""

import json
import os
import socket
import subprocess
import sys
import struct
import threading
import time
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SMOKE, align, needs_prepared
from flows import pipeline as pl
from stages.pipeline.plan import plan_run
from flows import ui_artifacts as ui
from stages.pipeline.lock import ExperimentBusy, experiment_lock, lock_path
from flows.serve import Schedule, build_deployments, is_iterative
from stages.config import load_config
from stages.pipeline.errors import BadInput
from stages.pipeline.runner import StageResult, stages_of_round
from stages.pipeline.store import ArtifactStore

ONLINE = ROOT / "configs" / "smoke_online_dpo.yaml"

# Flows called as plain functions here log outside a flow run; Prefect warns that it cannot ship those.
pytestmark = pytest.mark.filterwarnings("ignore:Logger 'align' attempted to send logs")


# -- one run per experiment ------------------------------------------------------------------------

def test_lock_refuses_a_second_run_with_one_line(tmp_path):
    with experiment_lock(str(tmp_path), "exp") as path:
        assert path == str(tmp_path / "exp" / ".lock")
        assert (tmp_path / "exp" / ".lock.pid").read_text().strip() == str(os.getpid())
        with pytest.raises(ExperimentBusy) as err:
            with experiment_lock(str(tmp_path), "exp"):
                pass
        message = str(err.value)
        assert message.startswith(f"experiment exp is already running (pid {os.getpid()})") and "\n" not in message
        assert isinstance(err.value, BadInput)  # so `align run` prints it as one line and exits 2
        with experiment_lock(str(tmp_path), "other"):  # other experiments are free
            pass
    with experiment_lock(str(tmp_path), "exp"):  # released
        pass


def test_lock_can_wait_for_the_running_one(tmp_path):
    held, order = threading.Event(), []

    def first():
        with experiment_lock(str(tmp_path), "exp"):
            held.set()
            time.sleep(0.6)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    held.wait(5)
    with experiment_lock(str(tmp_path), "exp", wait=True, poll_seconds=0.05):
        order.append("second ran")
    t.join()
    assert order == ["first done", "second ran"]


def test_object_store_roots_hold_a_renewed_lease_in_the_store(caplog):
    import fsspec

    root = "memory://lease-test/artifacts"
    fs = fsspec.filesystem("memory")
    url = lock_path(root, "exp")
    assert url.endswith("lease-test/artifacts/exp/.lock")
    with experiment_lock(root, "exp", lease_seconds=0.4) as held:
        assert held.startswith("memory://") and held.endswith("lease-test/artifacts/exp/.lock")
        first = json.loads(fs.cat_file(url))
        assert first["pid"] == os.getpid()
        time.sleep(0.5)  # past the first expiry: renewed, so still held
        with pytest.raises(ExperimentBusy, match=f"experiment exp is already running \\(pid {os.getpid()} on "):
            with experiment_lock(root, "exp"):
                pass
        assert json.loads(fs.cat_file(url))["expires"] > first["expires"]
    assert not fs.exists(url)  # released

    # A holder killed without releasing: its lease expires and the next run breaks it, saying whose.
    fs.pipe_file(url, json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}).encode())
    with caplog.at_level("WARNING", logger="align"), experiment_lock(root, "exp"):
        assert json.loads(fs.cat_file(url))["owner"] != "x"
    assert "breaking the expired lease of pid 1 on elsewhere" in caplog.text

    # A holder on this machine whose process is gone (SIGKILL) is broken at once, expired or not.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fs.pipe_file(url, json.dumps({"owner": "y", "host": socket.gethostname(), "pid": int(dead.stdout),
                                  "expires": time.time() + 3600}).encode())
    with caplog.at_level("WARNING", logger="align"), experiment_lock(root, "exp"):
        pass
    assert "breaking the dead process's lease" in caplog.text
    fs.rm("/lease-test", recursive=True)


@needs_prepared
def test_flow_refuses_while_the_experiment_is_locked(tmp_path, monkeypatch):
    """The lock is taken before any stage runs, by every run (CLI and UI alike)."""
    monkeypatch.setattr(pl, "stage_task", None)  # would fail loudly if a stage were reached
    with experiment_lock(str(tmp_path), "smoke"):
        with pytest.raises(ExperimentBusy, match="experiment smoke is already running"):
            pl.pipeline.fn(str(SMOKE), artifacts=str(tmp_path))
    monkeypatch.setattr(pl, "current_attempt", lambda: pl.Attempt(from_deployment=True))
    with experiment_lock(str(tmp_path), "smoke"):
        state = pl.pipeline.fn(str(SMOKE), artifacts=str(tmp_path))
    assert state.is_failed() and state.message.startswith("align: error: experiment smoke is already running")


def fake_manifest(stage: str, rows: int, **more) -> dict:
    """The keys every commit writes (a manifest without them reads as incomplete)."""
    return {"stage": stage, "rows": rows, "fingerprint": "fp", "run_id": f"run-{stage}", "files": {}, **more}


# -- adding rounds ---------------------------------------------------------------------------------

def _complete(store: ArtifactStore, experiment: str, k: int, stage: str) -> None:
    path = ROOT / store.stage_dir(experiment, k, stage)
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(fake_manifest(stage, 1)))


def test_add_rounds_continues_after_the_last_complete_round(tmp_path):
    cfg = load_config(ONLINE)  # 2 rounds in the config
    store = ArtifactStore(str(tmp_path))
    assert pl.complete_rounds(cfg, store) == 0
    assert pl.rounds_to_run(cfg, store, add_rounds=1) == 1  # a fresh experiment: round 0
    assert pl.rounds_to_run(cfg, store) == cfg.rounds == 2  # no add_rounds: the config's
    for k in (0, 1):
        for stage in stages_of_round(cfg, k):
            _complete(store, cfg.experiment, k, stage)
    assert pl.complete_rounds(cfg, store) == 2
    assert pl.rounds_to_run(cfg, store, add_rounds=1) == 3  # the next scheduled run trains round 2
    assert pl.rounds_to_run(cfg, store, add_rounds=2) == 4
    for stage in stages_of_round(cfg, 2)[:3]:  # round 2 stopped half way
        _complete(store, cfg.experiment, 2, stage)
    assert pl.complete_rounds(cfg, store) == 2
    assert pl.rounds_to_run(cfg, store, add_rounds=1) == 3  # finishes round 2 first


# -- skipped stages --------------------------------------------------------------------------------

def test_a_skipped_stage_ends_in_a_completed_state_named_skipped(tmp_path, monkeypatch):
    from prefect.serializers import JSONSerializer

    result = StageResult("train", 0, "skipped", "abc123", 12, str(tmp_path / "x"), 0.0, "up to date", {"loss": 1.5})
    monkeypatch.setattr(pl, "run_stage", lambda *a, **k: result)
    monkeypatch.setattr(ui, "stage_artifact", lambda *a: None)
    state = pl.stage_task.fn(load_config(SMOKE), "train", 0, str(tmp_path))
    assert state.is_completed() and state.name == "Skipped" and state.type.value == "COMPLETED"
    assert state.data == result.to_dict() and "train (round 0): complete artifact abc123 reused" == state.message
    assert json.loads(JSONSerializer().dumps(state.data)) == result.to_dict()  # persisted as JSON

    ran = StageResult("train", 0, "ran", "abc123", 12, str(tmp_path / "x"), 3.0, "forced")
    monkeypatch.setattr(pl, "run_stage", lambda *a, **k: ran)
    assert pl.stage_task.fn(load_config(SMOKE), "train", 0, str(tmp_path)) == ran.to_dict()


def test_fail_once_sets_the_runner_hook_only_inside_the_block(monkeypatch):
    monkeypatch.setenv("ALIGN_INJECT_FAULT", "sample:hang")
    with pl.injected_fault("train"):
        assert os.environ["ALIGN_INJECT_FAULT"] == "sample:hang,train:fail"
    assert os.environ["ALIGN_INJECT_FAULT"] == "sample:hang"
    monkeypatch.delenv("ALIGN_INJECT_FAULT")
    with pl.injected_fault(None):
        assert "ALIGN_INJECT_FAULT" not in os.environ


# -- bad parameters: one line, as the CLI says it ---------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    ({"config_path": ""}, "config_path: give a YAML run configuration"),
    ({"config_path": "configs/nope.yaml"}, "config file does not exist: configs/nope.yaml"),
    ({"overrides": ["train.learning_rte=1"]}, "unknown key 'train.learning_rte'"),
    ({"overrides": ["train.epochs=two"]}, "bad value for 'train.epochs'"),
    ({"overrides": ["oops"]}, "expected KEY=VALUE"),
    ({"rounds": -1}, "rounds: must be at least 1"),
    ({"add_rounds": -2}, "add_rounds: must be 0 or more"),
    ({"rounds": 2, "add_rounds": 1}, "give rounds or add_rounds, not both"),
    ({"overrides": ["train.model=/no/such/model"]}, "train.model: model path does not exist: /no/such/model"),
    # checked after the models are found
    pytest.param({"force": ["sample"]}, "--force sample: not a stage of this flow", marks=needs_prepared),
    pytest.param({"fail_once": "sample"}, "fail_once sample: not a stage of this flow", marks=needs_prepared),
])
def test_bad_parameters_are_one_line(kwargs, expected):
    args = {"config_path": str(SMOKE), **kwargs}
    with pytest.raises(BadInput) as err:
        plan_run(**args)
    assert expected in str(err.value) and "\n" not in str(err.value)


@needs_prepared
def test_parameters_from_the_form(tmp_path):
    """Empty form fields mean "not given"; rounds override the config's; relative paths find the project's configs."""
    plan = plan_run("configs/smoke_online_dpo.yaml", ["train.epochs=1", ""], "", "", [], 0, 0, "")
    assert plan.config.experiment == "smoke_online_dpo" and plan.config.train.epochs == 1
    assert plan.config.rounds == 2 and plan.forced == set() and plan.fail_once is None
    plan = plan_run(str(ONLINE), None, str(tmp_path), "mine", ["train"], 3, 0, "train")
    assert plan.config.rounds == 3 and plan.config.experiment == "mine" and plan.root == str(tmp_path)
    assert plan.forced == {"train", "evaluate"} and plan.fail_once == "train"


def test_a_bad_parameter_from_the_ui_is_a_failed_run_with_that_line(monkeypatch):
    monkeypatch.setattr(pl, "current_attempt", lambda: pl.Attempt(from_deployment=True))
    state = pl.pipeline.fn("configs/nope.yaml")
    assert state.is_failed() and state.message == "align: error: config file does not exist: configs/nope.yaml"
    monkeypatch.setattr(pl, "current_attempt", lambda: pl.Attempt(from_deployment=False))
    with pytest.raises(BadInput, match="config file does not exist"):  # `align run`: exit 2, one line
        pl.pipeline.fn("configs/nope.yaml")


# -- deployments and schedules -----------------------------------------------------------------------

def test_deployments_per_flow_and_config():
    deps = build_deployments([SMOKE, ONLINE], artifacts="/tmp/a")
    names = [(d.entrypoint.rsplit(".", 1)[-1], d.name) for d in deps]
    assert names == [("pipeline", "pipeline"), ("iterate", "rounds"), ("pipeline", "smoke"),
                     ("pipeline", "smoke_online_dpo"), ("iterate", "smoke_online_dpo")]
    assert all(d.parameters.get("artifacts") == "/tmp/a" for d in deps)
    assert deps[2].parameters["config_path"] == "configs/smoke.yaml" and not deps[2].schedules
    assert "config_path" not in deps[0].parameters
    schema = deps[0]._parameter_openapi_schema.model_dump()
    assert schema["required"] == ["config_path"]
    props = schema["properties"]
    assert props["overrides"]["type"] == "array" and props["overrides"]["default"] == []
    assert props["experiment"] == {**props["experiment"], "type": "string", "default": ""}
    assert props["rounds"]["default"] == 0 and props["if_running"]["enum"] == ["refuse", "wait"]
    assert "align run --set" in props["overrides"]["description"]


def test_a_schedule_goes_on_the_rounds_deployments():
    deps = build_deployments([SMOKE, ONLINE], schedule=Schedule(cron="0 * * * *"))
    scheduled = [(d.entrypoint.rsplit(".", 1)[-1], d.name) for d in deps if d.schedules]
    assert scheduled == [("iterate", "smoke"), ("iterate", "smoke_online_dpo")]
    assert deps[-1].schedules[0].schedule.cron == "0 * * * *"
    every = build_deployments([ONLINE], schedule=Schedule(interval_seconds=600))[-1].schedules[0].schedule
    assert every.interval.total_seconds() == 600
    assert is_iterative(load_config(ONLINE)) and not is_iterative(load_config(SMOKE))


@pytest.mark.parametrize("schedule, expected", [
    ({"cron": "every hour"}, "--cron 'every hour': not a cron expression"),
    ({"cron": "0 * * * *", "interval_seconds": 5}, "give --cron or --interval, not both"),
    ({"interval_seconds": 0}, "--interval: must be at least 1 second"),
])
def test_bad_schedules(schedule, expected):
    with pytest.raises(BadInput, match=expected.replace("*", r"\*")):
        Schedule(**schedule)


def test_serve_without_a_server_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    proc = align("serve", SMOKE, "--port", port, env={"PREFECT_API_URL": ""}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"align: error: no Prefect server answers at http://127.0.0.1:{port}/api: "
                                   "start one with `align server` (or point PREFECT_API_URL at yours)")
    proc = align("serve", tmp_path / "nope.yaml", "--port", port, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"align: error: config file does not exist: {tmp_path / 'nope.yaml'}"


# -- what the UI shows --------------------------------------------------------------------------------

def test_artifact_keys_are_what_prefect_accepts():
    assert ui.artifact_key("Smoke_DPO.v2", "load_prompts") == "smoke-dpo-v2-load-prompts"
    assert ui.artifact_key("smoke", "stages") == "smoke-stages"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    channels = {2: 3, 6: 4}[color]  # RGB or RGBA, 8 bits each
    idat = b"".join(data[i + 4:i + 4 + struct.unpack(">I", data[i - 4:i])[0]]
                    for i in range(len(data)) if data[i:i + 4] == b"IDAT")
    assert depth == 8 and len(zlib.decompress(idat)) == height * (1 + channels * width)  # a filter byte per row
    return width, height


def test_histogram_png_and_markdown():
    values = [i / 10 for i in range(50)] + [2.0] * 10
    edges, counts = ui.histogram(values, bins=5)
    assert sum(counts) == 60 and edges[0] == 0.0 and edges[-1] == pytest.approx(4.9)
    assert _png_size(ui.histogram_png(values)) == (480, 200)
    md = ui.histogram_markdown("held-out reward", values, 3)
    assert md.startswith("### Round 3: held-out reward") and "](data:image/png;base64," in md
    assert "60 values" in md and md.count("\n| ") == len(ui.histogram(values)[1]) + 1
    assert _png_size(ui.histogram_png([1.0])) == (480, 200)  # one value, zero width: still a picture


def _write(store_root, experiment, k, stage, rows, metrics=None):
    path = store_root / experiment / f"round-{k}" / stage
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "data.parquet")
    (path / "manifest.json").write_text(json.dumps(fake_manifest(stage, len(rows), metrics=metrics or {})))


def test_round_artifacts_from_disk(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(ui, "_create", lambda kind, key, payload, description: made.append((kind, key, payload)))
    rows = [{"prompt_id": i, "prompt": f"p{i}", "completion": f"c{i}", "score": i / 10} for i in range(12)]
    _write(tmp_path, "exp", 1, "annotate", rows, {"mean_score": 0.55})
    _write(tmp_path, "exp", 1, "evaluate", rows[:4], {"mean_reward": 0.2, "examples": [{"prompt": "x"}]})
    ui.round_artifacts(ArtifactStore(str(tmp_path)), "exp", 1, ["sample", "annotate", "train", "evaluate"], shown=3)
    kinds = {key: (kind, payload) for kind, key, payload in made}
    assert set(kinds) == {"exp-metrics", "exp-rewards", "exp-samples", "exp-report"}
    assert kinds["exp-report"][1].startswith("# exp, round 1") and "data:image/png;base64," in kinds["exp-report"][1]
    metrics = kinds["exp-metrics"][1]
    assert metrics[0] == {"round": 1, "stage": "evaluate", "metric": "mean_reward", "value": 0.2}
    assert {"round": 1, "stage": "annotate", "metric": "mean_score", "value": 0.55} in metrics
    assert all(m["metric"] != "examples" for m in metrics)  # lists stay out of the table
    rewards = kinds["exp-rewards"][1]
    assert "reward of the round's samples (annotate)" in rewards and "12 values" in rewards
    assert kinds["exp-samples"][1][0] == {"prompt": "p0", "completion": "c0", "score": 0.0}
    assert len(kinds["exp-samples"][1]) == 3  # evaluate.samples_to_show


def test_offline_flows_show_nll_and_held_out_records(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(ui, "_create", lambda kind, key, payload, description: made.append((key, payload, description)))
    pool = [{"prompt_id": i, "prompt": f"p{i}", "generation1": "g" * 300, "split": "heldout" if i % 2 else "train"}
            for i in range(6)]
    _write(tmp_path, "exp", 0, "build_pool", pool)
    _write(tmp_path, "exp", 0, "evaluate", [{"prompt_id": i, "logprob": -20.0, "tokens": 10} for i in (1, 3, 5)])
    ui.round_artifacts(ArtifactStore(str(tmp_path)), "exp", 0, ["load_prompts", "build_pool", "train", "evaluate"])
    made = {key: (payload, description) for key, payload, description in made}
    assert "held-out NLL per token" in made["exp-rewards"][0]
    samples, description = made["exp-samples"]
    assert [s["prompt"] for s in samples] == ["p1", "p3", "p5"] and samples[0]["nll_per_token"] == 2.0
    assert len(samples[0]["completion"]) == ui.TEXT_CHARS and "generates nothing" in description


def test_run_table_names_the_failed_stage(monkeypatch):
    made = []
    monkeypatch.setattr(ui, "_create", lambda kind, key, payload, description: made.append((key, payload, description)))
    done = StageResult("load_prompts", 0, "skipped", "f1", 96, "/a", 0.0, "up to date").to_dict()
    ui.run_artifact("exp", [done], ("train", 0))
    key, rows, description = made[0]
    assert key == "exp-stages" and [r["status"] for r in rows] == ["skipped", "failed"]
    assert description == "experiment exp: 0 stages ran, 1 skipped, train (round 0) failed"


# -- the flow's wiring, with a stand-in for the stage task (no Prefect run, no model) ----------------

class FakeStages:
    """Records each stage call and writes a manifest like the runner (skipping complete stages)."""

    def __init__(self, root):
        self.store, self.calls = ArtifactStore(str(root)), []

    def with_options(self, **_):
        return self

    def __call__(self, config, stage, round_, artifacts, force=False, fail=False, pool=None):
        self.calls.append((stage, round_, force, fail))
        path = ROOT / self.store.stage_dir(config.experiment, round_, stage)
        if fail:
            raise RuntimeError(f"injected fault in stage {stage}")
        status = "skipped" if (path / "manifest.json").exists() and not force else "ran"
        if status == "ran":
            path.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
            (path / "manifest.json").write_text(json.dumps(fake_manifest(stage, 1, started=stamp)))
        return StageResult(stage, round_, status, "fp", 1, str(path), 0.0).to_dict()


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    fake = FakeStages(tmp_path)
    monkeypatch.setattr(pl, "stage_task", fake)
    monkeypatch.setattr("stages.pipeline.plan.preflight", lambda cfg, root=None: None)  # no models needed
    monkeypatch.setattr(ui, "round_artifacts", lambda *a: None)
    monkeypatch.setattr(ui, "run_artifact", lambda *a: None)
    return fake


def test_each_scheduled_run_adds_one_round(tmp_path, fake_stages):
    def scheduled_run():
        fake_stages.calls.clear()
        results = pl.iterate.fn(str(ONLINE), artifacts=str(tmp_path))
        return sorted({r["round"] for r in results if r["status"] == "ran"})

    assert scheduled_run() == [0]  # a fresh experiment: round 0 only, though the config says 2
    assert scheduled_run() == [1]  # round 0 is skipped, round 1 trains from round 0's policy
    assert scheduled_run() == [2]
    assert {k for _, k, *_ in fake_stages.calls} == {0, 1, 2}  # earlier rounds are checked, not re-run


def test_retry_runs_the_failed_stage_and_keeps_what_the_first_attempt_forced(tmp_path, fake_stages, monkeypatch):
    from datetime import datetime, timedelta, timezone

    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    monkeypatch.setattr(pl, "current_attempt", lambda: pl.Attempt(1, started, True))
    with pytest.raises(RuntimeError, match="injected fault in stage train"):
        pl.pipeline.fn(str(SMOKE), artifacts=str(tmp_path), force=["build_pool"], fail_once="train")
    assert fake_stages.calls == [("load_prompts", 0, False, False), ("build_pool", 0, True, False),
                                 ("train", 0, True, True)]
    fake_stages.calls.clear()
    monkeypatch.setattr(pl, "current_attempt", lambda: pl.Attempt(2, started, True))  # Retry: same run
    results = pl.pipeline.fn(str(SMOKE), artifacts=str(tmp_path), force=["build_pool"], fail_once="train")
    assert fake_stages.calls == [("load_prompts", 0, False, False), ("build_pool", 0, False, False),
                                 ("train", 0, True, False), ("evaluate", 0, True, False)]
    assert [r["status"] for r in results] == ["skipped", "skipped", "ran", "ran"]


def test_an_experiments_deployments_run_one_at_a_time_and_queue_the_rest():
    deps = build_deployments([SMOKE, ONLINE], schedule=Schedule(cron="0 * * * *"))
    limits = {(d.entrypoint.rsplit(".", 1)[-1], d.name): (d.concurrency_limit, d.concurrency_options) for d in deps}
    assert limits[("pipeline", "pipeline")][0] is None and limits[("iterate", "rounds")][0] is None  # any config
    for key in [("pipeline", "smoke"), ("iterate", "smoke"), ("iterate", "smoke_online_dpo")]:
        limit, options = limits[key]
        assert limit == 1 and options.collision_strategy.value == "ENQUEUE"


RETRIES = """
import json
from prefect import task
from flows import pipeline as pl
from stages.pipeline.errors import BadInput

errors = [ConnectionResetError("peer reset"), TimeoutError("read timed out"),
          type("EndpointConnectionError", (Exception,), {})("s3 unreachable"),
          RuntimeError("upload failed"), BadInput("train.model: no such model"), ValueError("nan loss")]
calls = []
for error in errors:
    count = []

    @task(**{**pl.STAGE_RETRIES, "retry_delay_seconds": 0})
    def flaky():
        count.append(1)
        if len(count) == 1:
            raise RuntimeError("stage failed") from error
        return "done"

    try:
        flaky()
    except RuntimeError:
        pass
    calls.append(len(count))
print(json.dumps(calls))
"""


def test_a_stage_is_retried_by_prefect_only_for_transient_errors():
    """The stage task's own retry options on tasks run by Prefect's engine (in a process of their own:
    the engine's temporary server and log handlers stay out of this one): a transient error, also as
    the cause of another, is tried again; a bug or a bad input fails at once."""
    done = subprocess.run([sys.executable, "-c", RETRIES], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [2, 2, 2, 1, 1, 1]
