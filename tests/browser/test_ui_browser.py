"""The Prefect UI in a real browser: `align server` on a free loopback port with a temp PREFECT_HOME,
`align serve configs/smoke.yaml`, and Debian's chromium driven by playwright.

- a run triggered from the Run form with parameters completes, and its artifacts open;
- a stage made to fail once (the `fail_once` parameter) fails the run; Retry in the UI then runs
  only the failed stage and its downstream (checked in the manifests), the rest shows as Skipped;
- a bad parameter is a failed run whose message is the CLI's one line; the server keeps serving;
- runs of the scheduled rounds deployment queue on the experiment's lock, and each adds one round.

Run alone with `pytest -m browser`. Set ALIGN_UI_SCREENSHOT=docs/ui-run.png to refresh the image in docs/ui.md.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port, needs_prepared, stop

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    needs_prepared,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"),
    pytest.mark.timeout(900),
]


def poll(predicate, timeout: float, what: str = "", proc: subprocess.Popen | None = None, log: Path | None = None):
    """predicate()'s first truthy value within timeout seconds, else None; fails if proc exits meanwhile."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}):\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(1)
    return None


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    value = poll(predicate, timeout, what, proc, log)
    if not value:
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")
    return value


class Stack:
    """`align server` and `align serve configs/smoke.yaml`, and a little of the REST API to check on them."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.base}/api"
        self.artifacts = tmp / "artifacts"
        self.env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"),
                    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "prefect" / "storage"),
                    "PREFECT_RUNNER_POLL_FREQUENCY": "2", "ALIGN_ARTIFACTS": str(self.artifacts)}
        self.env.pop("PREFECT_API_URL", None)
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env={**self.env, **(env or {})},
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def request(self, method: str, path: str, body: dict | None = None):
        """The JSON answer; a 5xx (SQLite busy on a loaded machine) is retried, anything else not 2xx fails
        with the server's own words. Retrying writes is safe where the caller passes an idempotency key."""
        for attempt in range(5):
            try:
                response = httpx.request(method, f"{self.api}{path}", json=body, timeout=60)
            except httpx.TransportError as error:
                problem = repr(error)
            else:
                if response.is_success:
                    return response.json()
                problem = f"{response.status_code} {response.text[:2000]}"
                if response.status_code < 500:
                    break
            print(f"{method} {path}: {problem}; retrying", file=sys.stderr)
            time.sleep(2 ** attempt)
        pytest.fail(f"{method} {path}: {problem}\nserver log:\n{self.server_log.read_text()[-3000:]}")

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body: dict):
        return self.request("POST", path, body)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def deployments(self) -> dict[str, str]:
        """'flow/deployment' -> id."""
        flows = {f["id"]: f["name"] for f in self.post("/flows/filter", {})}
        return {f"{flows.get(d['flow_id'])}/{d['name']}": d["id"] for d in self.post("/deployments/filter", {})}

    def run_ids(self, deployment: str) -> set[str]:
        body = {"deployments": {"id": {"any_": [self.deployments()[deployment]]}}}
        return {r["id"] for r in self.post("/flow_runs/filter", body)}

    def flow_run(self, run_id: str) -> dict:
        return self.get(f"/flow_runs/{run_id}")

    def wait_for_run(self, run_id: str, attempt: int = 1, timeout: float = 300) -> dict:
        def done():
            run = self.flow_run(run_id)
            state = run.get("state") or {}
            final = state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            return run if final and run["run_count"] >= attempt else None

        return wait_until(done, timeout, f"flow run {run_id} (attempt {attempt})", self.serve_proc, self.serve_log)

    def task_states(self, run_id: str) -> dict[str, list[str]]:
        """task run name -> its state names, oldest first."""
        body = {"flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
        runs = self.post("/task_runs/filter", body)
        out: dict[str, list[str]] = {}
        for r in runs:
            out.setdefault(r["name"], []).append(r["state"]["name"])
        return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("ui"))
    t0 = time.monotonic()
    server, s.server_log = s.start("server", "server", "--port", str(s.port))
    try:
        wait_until(s.healthy, 300, "the Prefect server", server, s.server_log)
        t1 = time.monotonic()
        s.serve_proc, s.serve_log = s.start("serve", "serve", "configs/smoke.yaml", "--artifacts", str(s.artifacts),
                                            "--interval", "86400", env={"PREFECT_API_URL": s.api})
        expected = {"align-pipeline/pipeline", "align-rounds/rounds", "align-pipeline/smoke", "align-rounds/smoke"}
        wait_until(lambda: expected <= set(s.deployments()), 180, "the served deployments", s.serve_proc, s.serve_log)
        print(f"server up in {t1 - t0:.0f}s, deployments served {time.monotonic() - t1:.0f}s later")
        yield s
    finally:
        for proc in reversed(s.procs):
            stop(proc)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


# -- driving the UI ------------------------------------------------------------------------------------

def form_field(page, name: str):
    """A parameter of the Run form, found by its label."""
    label = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{name}\b"))
    return page.locator(".p-label.schema-form-property", has=label)


def run_from_form(page, stack: Stack, deployment: str, texts: dict | None = None, lists: dict | None = None) -> str:
    """Open the deployment, Run -> Custom run, fill the form, Submit; the new flow run's id."""
    page.goto(f"{stack.base}/deployments/deployment/{stack.deployments()[deployment]}", wait_until="networkidle")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.wait_for_load_state("networkidle")
    for name, value in (texts or {}).items():
        form_field(page, name).locator("textarea").first.fill(value)
    for name, values in (lists or {}).items():
        field = form_field(page, name)
        for value in values:
            field.get_by_role("button", name="Add item").click()
            field.locator("textarea").last.fill(value)
    before = stack.run_ids(deployment)
    new_run = lambda: next(iter(stack.run_ids(deployment) - before), None)  # noqa: E731
    # On a loaded machine a click can land while the form still re-renders and submit nothing:
    # click again, as a user would, while no run has appeared and the form is still there.
    for _ in range(3):
        page.get_by_role("button", name="Submit").click()
        if run_id := poll(new_run, 30, "the new flow run", stack.serve_proc, stack.serve_log):
            return run_id
        if not page.get_by_role("button", name="Submit").is_visible():
            break
    return wait_until(new_run, 60, "the new flow run", stack.serve_proc, stack.serve_log)


def open_run(page, stack: Stack, run_id: str, tab: str | None = None) -> None:
    page.goto(f"{stack.base}/runs/flow-run/{run_id}", wait_until="networkidle")
    if tab:
        page.get_by_text(tab, exact=True).first.click()
        page.wait_for_load_state("networkidle")


def manifests(stack: Stack, experiment: str, round_: int = 0) -> dict[str, dict]:
    base = stack.artifacts / experiment / f"round-{round_}"
    return {p.parent.name: json.loads(p.read_text()) for p in base.glob("*/manifest.json")}


STAGES = ["load_prompts", "build_pool", "train", "evaluate"]


# -- the tests -----------------------------------------------------------------------------------------

def test_run_from_the_form_with_parameters_then_open_its_artifacts(stack, page):
    run_id = run_from_form(page, stack, "align-pipeline/smoke", texts={"experiment": "ui_form"},
                           lists={"overrides": ["train.epochs=1"]})
    run = stack.wait_for_run(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["overrides"] == ["train.epochs=1"] and run["parameters"]["experiment"] == "ui_form"
    done = manifests(stack, "ui_form")
    assert sorted(done) == sorted(STAGES) and done["train"]["config"]["epochs"] == 1  # the override took

    open_run(page, stack, run_id)  # the run's log holds the stages' own lines
    page.get_by_text("train (round 0): running").first.wait_for()
    page.get_by_text(re.compile(r"evaluate: held-out NLL per token")).first.wait_for()

    open_run(page, stack, run_id, "Artifacts")
    for key in ("ui-form-stages", "ui-form-metrics", "ui-form-rewards", "ui-form-samples"):
        page.get_by_text(key, exact=True).first.wait_for()
    per_stage = stack.post("/artifacts/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    assert {f"ui-form-{s.replace('_', '-')}" for s in STAGES} <= {a["key"] for a in per_stage}  # on the task runs
    page.get_by_text("ui-form-rewards", exact=True).first.click()
    image = page.locator("img[src^='data:image/png;base64,']").first
    image.wait_for()
    assert image.evaluate("img => img.complete && img.naturalWidth") == 480  # the histogram decoded
    page.get_by_text("values: min").first.wait_for()

    open_run(page, stack, run_id, "Artifacts")
    page.get_by_text("ui-form-stages", exact=True).first.click()
    table = page.locator("table").first
    table.wait_for()
    text = table.inner_text()
    assert all(stage in text for stage in STAGES) and done["train"]["fingerprint"] in text


def test_a_failed_stage_then_retry_in_the_ui_reruns_only_it_and_downstream(stack, page):
    run_id = run_from_form(page, stack, "align-pipeline/smoke", texts={"experiment": "ui_retry", "fail_once": "train"},
                           lists={"overrides": ["train.epochs=1"], "force": ["build_pool"]})
    run = stack.wait_for_run(run_id)
    assert run["state"]["type"] == "FAILED" and "injected fault in stage train" in run["state"]["message"]
    first = manifests(stack, "ui_retry")
    assert sorted(first) == ["build_pool", "load_prompts"]  # the failed stage left nothing behind

    open_run(page, stack, run_id)
    retried_at = datetime.now(timezone.utc).replace(microsecond=0)
    page.get_by_role("button", name="Retry").first.click()
    page.get_by_role("button", name="Retry").last.click()  # the confirmation dialog
    run = stack.wait_for_run(run_id, attempt=2)
    assert run["state"]["type"] == "COMPLETED", run["state"]

    after = manifests(stack, "ui_retry")
    for stage in ("load_prompts", "build_pool"):  # complete before the retry: not run again (force included)
        assert after[stage]["run_id"] == first[stage]["run_id"], stage
    for stage in ("train", "evaluate"):  # the failed stage and its downstream ran in the retry
        assert datetime.fromisoformat(after[stage]["started"]) >= retried_at, stage
    states = stack.task_states(run_id)
    assert states["load_prompts (round 0)"] == ["Completed", "Skipped"]
    assert states["build_pool (round 0)"] == ["Completed", "Skipped"]
    assert states["train (round 0)"] == ["Failed", "Completed"] and states["evaluate (round 0)"] == ["Completed"]

    page.set_viewport_size({"width": 1280, "height": 1000})
    open_run(page, stack, run_id, "Task Runs")
    page.get_by_text("Skipped", exact=True).first.wait_for()
    page.wait_for_timeout(1500)  # let the run graph settle
    shot = stack.tmp / "ui-run.png"  # docs/ui.md's picture: the retried run, its graph and Skipped stages
    page.screenshot(path=str(shot), clip={"x": 256, "y": 0, "width": 1024, "height": 960})
    if os.environ.get("ALIGN_UI_SCREENSHOT"):
        shutil.copy(shot, ROOT / os.environ["ALIGN_UI_SCREENSHOT"])


def test_a_bad_parameter_is_a_failed_run_with_the_cli_one_line_error(stack, page):
    run_id = run_from_form(page, stack, "align-pipeline/pipeline", texts={"config_path": "configs/nope.yaml"})
    run = stack.wait_for_run(run_id)
    assert run["state"]["type"] == "FAILED"
    assert run["state"]["message"] == "align: error: config file does not exist: configs/nope.yaml"
    open_run(page, stack, run_id)
    page.get_by_text("align: error: config file does not exist: configs/nope.yaml").first.wait_for()
    assert stack.serve_proc.poll() is None and stack.healthy()  # still serving


def test_scheduled_rounds_wait_for_the_running_one_and_each_adds_a_round(stack):
    """Two runs of the scheduled deployment while another process holds the experiment: the
    deployment runs one at a time, so one starts and waits for the experiment's lock while Prefect
    holds the other in AwaitingConcurrencySlot; then each adds one round (a two-stage flow keeps it
    quick)."""
    from stages.pipeline.lock import experiment_lock

    deployment_id = stack.deployments()["align-rounds/smoke"]
    schedule = stack.get(f"/deployments/{deployment_id}")["schedules"][0]["schedule"]
    assert schedule["interval"] == 86400
    params = {"experiment": "ui_rounds", "overrides": ["stages=[load_prompts, build_pool]"]}
    with experiment_lock(str(stack.artifacts), "ui_rounds"):
        runs = [stack.post(f"/deployments/{deployment_id}/create_flow_run",
                           {"parameters": params, "idempotency_key": f"ui-rounds-{i}-{stack.port}"})["id"]
                for i in range(2)]

        def one_on_the_lock_one_queued():
            logs = stack.post("/logs/filter", {"logs": {"flow_run_id": {"any_": runs}}})
            on_lock = {log["flow_run_id"] for log in logs
                       if f"experiment ui_rounds is already running (pid {os.getpid()})" in log["message"]}
            queued = {r for r in runs if (stack.flow_run(r).get("state") or {}).get("name") == "AwaitingConcurrencySlot"}
            return len(on_lock) == 1 and queued == set(runs) - on_lock

        wait_until(one_on_the_lock_one_queued, 180, "one run waiting for the lock, the other for its slot",
                   stack.serve_proc, stack.serve_log)
    for run_id in runs:
        assert stack.wait_for_run(run_id)["state"]["type"] == "COMPLETED"
    assert sorted(manifests(stack, "ui_rounds", 0)) == ["build_pool", "load_prompts"]
    assert sorted(manifests(stack, "ui_rounds", 1)) == ["build_pool"]  # load_prompts runs once
    assert not (stack.artifacts / "ui_rounds" / "round-2").exists()
