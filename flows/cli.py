"""The `align` command line.

Exit codes: 0 success, 2 bad input (config, data, missing inputs), 1 failure while running.
Errors are one line on stderr naming the field, column or path; `--debug` adds the traceback.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import flows  # noqa: F401  (configures Prefect's environment first)
import click
import typer
from rich.console import Console
from rich.table import Table

from stages.pipeline.errors import BadInput
from stages.pipeline.paths import default_artifact_root

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Alignment workbench: restartable Prefect stages with Parquet artifacts.")
models_app = typer.Typer(no_args_is_help=True, help="Offline models.")
data_app = typer.Typer(no_args_is_help=True, help="Offline data.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
console = Console(stderr=False)

SetOpt = typer.Option([], "--set", help="Override a config value: a.b=value (repeatable).")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (not the one at set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _setup_logging() -> None:
    logger = logging.getLogger("align")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML run configuration."),
    set_: list[str] = SetOpt,
    artifacts: Optional[str] = typer.Option(None, help="Artifact root (any fsspec URL); default ./artifacts."),
    experiment: Optional[str] = typer.Option(None, help="Experiment name (default: the config's)."),
    force: list[str] = typer.Option([], "--force", help="Re-run this stage and everything downstream (repeatable)."),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Run the stages directly, without Prefect."),
    debug: bool = DebugOpt,
):
    """Run CONFIG's flow through Prefect; complete stages are skipped."""
    from stages.pipeline.plan import plan_run

    # Checked here too, before Prefect starts: a bad config costs no server start-up.
    plan = plan_run(str(config), list(set_), artifacts, experiment, list(force))
    cfg, root = plan.config, plan.root
    if no_prefect:
        from stages.pipeline.lock import experiment_lock
        from stages.pipeline.runner import run_flow_locally
        from stages.pipeline.store import ArtifactStore

        _setup_logging()
        with experiment_lock(root, cfg.experiment):
            results = [r.to_dict() for r in run_flow_locally(cfg, ArtifactStore(root), force)]
    else:
        from flows.pipeline import QUIET, pipeline

        if not debug:
            os.environ[QUIET] = "1"  # flows.pipeline.quiet_console, once Prefect's handlers exist
        results = pipeline(str(config), list(set_), root, experiment, list(force))
    table = Table(title=f"experiment {cfg.experiment}")
    for col in ("round", "stage", "status", "rows", "fingerprint", "wall s"):
        table.add_column(col)
    for r in results:
        table.add_row(str(r["round"]), r["stage"], r["status"], str(r["rows"]), r["fingerprint"], f"{r['wall_seconds']:.1f}")
    console.print(table)
    evaluations = [r for r in results if r["stage"] == "evaluate"]
    if evaluations:
        console.print(f"evaluate (round {evaluations[-1]['round']}): {evaluation_summary(evaluations[-1]['metrics'])}"
                      "; every metric: align report, or the stage's manifest.json")
    console.print(f"artifacts: {Path(root) / cfg.experiment if '://' not in root else root + '/' + cfg.experiment}")


def evaluation_summary(metrics: dict) -> str:
    """A round's headline metrics in one short line: each with its interval where it has one."""
    from stages.pipeline.report import with_interval

    names = [("mean_reward", "reward"), ("reward_gain", "gain over base"), ("kl_to_reference", "KL"),
             ("conditioning_pairwise", "conditioning probe"), ("heldout_reward_accuracy", "held-out accuracy"),
             ("heldout_nll", "held-out NLL per token"), ("heldout_loss", "held-out loss")]
    shown = [f"{label} {with_interval(metrics, m)}" for m, label in names if isinstance(metrics.get(m), (int, float))]
    return ", ".join(shown) or ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:4] if isinstance(v, float))


@app.command()
def stage(
    name: str = typer.Argument(..., help="Stage to run: load_prompts, build_pool, train, evaluate."),
    config: Path = typer.Option(..., "--config", help="YAML run configuration."),
    round_: int = typer.Option(0, "--round", min=0, help="Round whose artifacts to read and write."),
    set_: list[str] = SetOpt,
    artifacts: Optional[str] = typer.Option(None, help="Artifact root (any fsspec URL)."),
    experiment: Optional[str] = typer.Option(None),
    force: bool = typer.Option(False, "--force", help="Run even if a complete artifact exists."),
    debug: bool = DebugOpt,
):
    """Run one stage alone (its inputs must exist), without Prefect."""
    from stages.pipeline.lock import experiment_lock
    from stages.pipeline.plan import plan_run
    from stages.pipeline.runner import run_stage
    from stages.pipeline.store import ArtifactStore

    plan = plan_run(str(config), list(set_), artifacts, experiment)
    cfg, root = plan.config, plan.root
    if name not in cfg.stages:
        raise BadInput(f"stage '{name}' is not part of {config} (stages: {', '.join(cfg.stages)})")
    _setup_logging()
    with experiment_lock(root, cfg.experiment):
        r = run_stage(cfg, name, round_, ArtifactStore(root), force=force)
    console.print(f"{r.stage} (round {r.round}): {r.status}, {r.rows} rows, fingerprint {r.fingerprint} -> {r.path}")


@app.command()
def inspect(directory: str = typer.Argument(..., help="An experiment folder, or an artifact root.")):
    """A table of an experiment's rounds and stages: status, rows, fingerprint, wall time."""
    from stages.pipeline.store import ArtifactStore

    parent, _, name = directory.rstrip("/").rpartition("/")
    store = ArtifactStore(parent or ".")
    if not store.rounds(name):
        root = ArtifactStore(directory)
        experiments = [e.rstrip("/").rsplit("/", 1)[-1] for e in root.fs.ls(root.root, detail=False)
                       if root.fs.isdir(e)] if root.fs.isdir(root.root) else []
        experiments = [e for e in experiments if root.rounds(e)]
        if not experiments:
            raise BadInput(f"inspect: no experiment artifacts under {directory}")
        store, names = root, experiments
    else:
        names = [name]
    for exp in names:
        table = Table(title=f"experiment {exp}")
        for col in ("round", "stage", "status", "rows", "fingerprint", "wall s", "finished"):
            table.add_column(col)
        for k in store.rounds(exp):
            for st in store.stages_in_round(exp, k):
                path = store.stage_dir(exp, k, st)
                m = store.read_manifest(path)
                if m is None:
                    table.add_row(str(k), st, "[red]incomplete[/]", "", "", "", "")
                    continue
                problem = store.verify(path, m)
                stale = None if problem else store.lineage(m)
                status = (f"[red]corrupt: {problem}[/]" if problem else f"[yellow]stale: {stale}[/]" if stale
                          else "[green]complete[/]")
                table.add_row(str(k), st, status, str(m["rows"]), m["fingerprint"], f"{m['wall_seconds']:.1f}", m["finished"])
        console.print(table)


@app.command()
def report(
    experiments: list[str] = typer.Argument(..., help="Experiment names under the artifact root; A+B+C names one "
                                                      "method run with several seeds (one experiment each)."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root (any fsspec URL); default ./artifacts."),
    out: Optional[Path] = typer.Option(None, help="Where to write the reward-vs-KL picture (PNG); default "
                                                  "<artifacts>/report-<experiments>.png."),
    wide: bool = typer.Option(False, "--wide", help="Every column, whatever the terminal's width."),
    format_: str = typer.Option("table", "--format", help="table (the terminal), md, csv or json (to stdout)."),
):
    """Every round's metrics of the experiments side by side, and one reward-vs-KL picture of them all;
    for A+B+C also the mean, spread and range over the seeds. A terminal narrower than the full
    table gets the main columns, each interval under its value (--wide for all)."""
    from stages.pipeline.report import (COLUMNS, NARROW_COLUMNS, SEED_METRICS, across_seeds, base_row, export,
                                        reward_vs_kl_png, rounds_table, seeds_series, with_interval, with_spread)
    from stages.pipeline.store import ArtifactStore

    root = artifacts or default_artifact_root()
    store = ArtifactStore(root)
    groups: dict[str, list[str]] = {}
    for arg in experiments:
        names = [n for n in arg.split("+") if n]
        if not names or len(set(names)) != len(names):
            raise BadInput(f"report: '{arg}' must name distinct experiments joined by '+'")
        groups[arg] = names
    series = {}
    for names in groups.values():
        for exp in names:
            rows = rounds_table(store, exp)
            if not rows:
                raise BadInput(f"report: experiment {exp} has no evaluated round under {root}")
            series[exp] = rows
    if format_ not in ("table", "md", "csv", "json"):
        raise BadInput(f"report: --format {format_!r} is not one of table, md, csv, json")
    if format_ != "table":
        sys.stdout.write(export(series, {arg: [series[n] for n in names] for arg, names in groups.items()}, format_))
        return
    # A narrow terminal gets one table per experiment with the main columns, each interval under
    # its value; a column no round has (the probe, outside Quark and NLF) is left out.
    narrow = not wide and console.width < 160
    measured = {k for rows in series.values() for r in rows for k, v in r.items() if v is not None}
    columns = [(m, h) for m, h in NARROW_COLUMNS if m in measured] if narrow else list(COLUMNS)
    cell = (lambda r, m: with_interval(r, m).replace(" [", "\n[")) if narrow else with_interval  # noqa: E731

    def metrics_table(title: str, experiments: list[str]) -> Table:
        table = Table(title=title)
        for col in ([] if narrow else ["experiment"]) + ["round", *(h for _, h in columns)]:
            table.add_column(col)
        for exp in experiments:
            rows, lead = series[exp], [] if narrow else [exp]
            base = base_row(rows)
            if base:
                cells = {"mean_reward": cell(base, "base_mean_reward"), "kl_to_reference": "0"}
                table.add_row(*lead, "base", *(cells.get(m, "") for m, _ in columns))
            for r in rows:
                table.add_row(*lead, str(r["round"]), *(cell(r, m) for m, _ in columns))
        return table

    title = "held-out metrics per round (95% intervals over prompts)"
    if narrow:
        console.print(f"{title}; --wide for every column")
        for exp in series:
            console.print(metrics_table(exp, [exp]))
    else:
        console.print(metrics_table(title, list(series)))
    seeded = [names for names in groups.values() if len(names) > 1]
    if seeded:
        metrics = [(m, h) for m, h in SEED_METRICS
                   if not narrow or m == "gain" or m in {c for c, _ in columns}]
        spread = Table(title="across seeds: mean ± standard deviation [min, max]")
        for col in ("method (seeds)", "round", *(h for _, h in metrics)):
            spread.add_column(col, overflow="fold")
        for names in seeded:
            for r in across_seeds([series[n] for n in names]):
                values = [with_spread(r, m).replace(" [", "\n[") if narrow else with_spread(r, m) for m, _ in metrics]
                spread.add_row(f"{names[0]}\n({r['seeds']} seeds)" if narrow else f"{names[0]} ({r['seeds']})",
                               str(r["round"]), *values)
        console.print(spread)
    # The picture: one line per experiment, or per method over seeds (its mean, bars the seeds' range).
    drawn = {(f"{names[0]} ({len(names)} seeds, range)" if len(names) > 1 else names[0]):
             (seeds_series([series[n] for n in names]) if len(names) > 1 else series[names[0]])
             for names in groups.values()}
    png = reward_vs_kl_png(drawn)
    if out:
        if not out.parent.is_dir():
            raise BadInput(f"--out {out}: the folder {out.parent} does not exist")
        out.write_bytes(png)
        target = str(out)
    else:
        path = f"{store.root.rstrip('/')}/report-{'-'.join(names[0] for names in groups.values())}.png"
        store.fs.pipe_file(path, png)
        target = path if store.local else store.fs.unstrip_protocol(path)
    console.print(f"reward vs KL: {target}")


def _experiment_at(arg: str, command: str) -> tuple[str, int | None]:
    """EXPERIMENT[@ROUND] as `compare` and `agreement` take it: the round, or None where not given."""
    exp, _, round_ = arg.partition("@")
    if round_ and not round_.isdigit():
        raise BadInput(f"{command}: '{arg}': the round after '@' must be a number")
    return exp, int(round_) if round_ else None


@app.command()
def compare(
    a: str = typer.Argument(..., help="An experiment, or EXPERIMENT@ROUND (default: its last evaluated round)."),
    b: str = typer.Argument(..., help="The experiment to compare it with, the same way."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root (any fsspec URL); default ./artifacts."),
    format_: str = typer.Option("table", "--format", help="table (the terminal) or json (to stdout)."),
):
    """Is A better than B? Their held-out reward and KL, paired prompt by prompt: A minus B with its
    95% bootstrap interval over prompts (two gain intervals that overlap do not answer it)."""
    import json

    from stages.pipeline.report import compare_rounds, fmt, rounds_table, with_interval
    from stages.pipeline.store import ArtifactStore

    root = artifacts or default_artifact_root()
    store = ArtifactStore(root)

    def which(arg: str) -> tuple[str, int]:
        exp, round_ = _experiment_at(arg, "compare")
        if round_ is not None:
            return exp, round_
        rows = rounds_table(store, exp)
        if not rows:
            raise BadInput(f"compare: experiment {exp} has no evaluated round under {root}")
        return exp, rows[-1]["round"]

    if format_ not in ("table", "json"):
        raise BadInput(f"compare: --format {format_!r} is not one of table, json")
    try:
        result = compare_rounds(store, which(a), which(b))
    except ValueError as e:
        raise BadInput(str(e)) from None
    if format_ == "json":
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return
    table = Table(title=f"{result['a']} minus {result['b']}, paired over {result['prompts']} held-out prompts "
                        "(95% bootstrap interval)")
    for col in ("metric", result["a"], result["b"], "A - B"):
        table.add_column(col)
    for name, heading in (("reward", "reward"), ("kl", "KL")):
        if f"{name}_difference" in result:
            table.add_row(heading, fmt(result[f"{name}_a"]), fmt(result[f"{name}_b"]),
                          with_interval(result, f"{name}_difference"))
    console.print(table)
    if result.get("same_base"):
        console.print("Both rounds paired with the same base samples: the reward difference is also the "
                      "difference of their gains.")


@app.command()
def agreement(
    round_: str = typer.Argument(..., metavar="EXPERIMENT[@ROUND]",
                                 help="An experiment, or EXPERIMENT@ROUND (default: round 0)."),
    config: Optional[str] = typer.Option(None, help="A run config whose evaluate.annotate is the yardstick "
                                                    "(default: the one the round's evaluate used)."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root (any fsspec URL); default ./artifacts."),
    format_: str = typer.Option("table", "--format", help="table (the terminal) or json (to stdout)."),
    save: bool = typer.Option(False, "--save", help="Also write it, with its provenance, to the round's "
                                                    "agreement.json (`make results` copies it to docs/results)."),
):
    """Do the pairs a round trained on agree with the annotator evaluate measures with? Re-scores the
    round's chosen and rejected samples (e.g. an LLM judge's pairs, with the reward model): the
    fraction ordered the same way and the mean margin, with 95% bootstrap intervals over pairs."""
    import json

    from stages.config import annotator_step, load_config
    from stages.pipeline.report import pair_agreement, with_interval
    from stages.pipeline.store import ArtifactStore

    if format_ not in ("table", "json"):
        raise BadInput(f"agreement: --format {format_!r} is not one of table, json")
    exp, k = _experiment_at(round_, "agreement")
    k = k or 0
    root = artifacts or default_artifact_root()
    store = ArtifactStore(root)
    if config:
        cfg = load_config(config)
        section = cfg.evaluate.annotate or cfg.annotate
        steps = list(section.steps)
    else:
        ev = store.read_manifest(store.stage_dir(exp, k, "evaluate"))
        if not isinstance(ev, dict) or not (ev.get("config", {}).get("annotate") or {}).get("steps"):
            raise BadInput(f"agreement: {exp}@{k} has no evaluate manifest with annotate steps under {root}: "
                           "pass --config with the run config whose evaluate.annotate to measure with")
        steps = [annotator_step(**s) for s in ev["config"]["annotate"]["steps"]]
    try:
        result = pair_agreement(store, exp, k, steps)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if save:
        from datetime import datetime, timezone

        from stages.pipeline.provenance import provenance

        result = {**result, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "provenance": provenance()}
        path = f"{store.experiment_dir(exp)}/round-{k}/agreement.json"
        store.fs.pipe_file(path, json.dumps(result, indent=1).encode())
        sys.stderr.write(f"agreement: wrote {path}\n")  # stdout stays the table or the JSON
    if format_ == "json":
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return
    table = Table(title=f"{result['round']}: {result['pairs']} pairs labelled by {result['labelled_by']}, "
                        f"re-scored by {result['yardstick']} (95% bootstrap interval)")
    table.add_column("metric")
    table.add_column("value")
    for name, heading in (("agreement", "same order"), ("margin", "chosen - rejected")):
        table.add_row(heading, with_interval(result, name))
    console.print(table)


@app.command()
def push(
    experiment: str = typer.Argument(..., help="The experiment whose trained policy to upload."),
    repo: str = typer.Option(..., "--repo", help="The hub repository, ORG/NAME (created if missing)."),
    round_: Optional[int] = typer.Option(None, "--round", min=0, help="The round (default: the last trained)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root (any fsspec URL); default ./artifacts."),
):
    """Upload a round's trained policy to the Hugging Face hub, with its model card (base model,
    objective and options, data and revision, held-out evaluation). Needs HF_HUB_OFFLINE=0 and a token."""
    from stages.pipeline.store import ArtifactStore
    from stages.services.hub_push import push_policy

    url = push_policy(ArtifactStore(artifacts or default_artifact_root()), experiment, repo, round_, private)
    console.print(f"pushed {experiment} to {url}")


@app.command()
def docs():
    """Regenerate the pages made from the code and the runs of record: docs/config-reference.md
    (from the config models) and docs/results.md (from docs/results)."""
    from flows import config_reference, results_page

    missing = config_reference.write()
    results_page.write()
    console.print(f"wrote {config_reference.PAGE} and {results_page.PAGE}")
    if missing:
        raise BadInput(f"docs: {len(missing)} config fields have no comment to explain them: {', '.join(missing)}")


@models_app.command("prepare")
def models_prepare():
    """Convert SmolLM2-135M-Instruct from its GGUF file, build the tiny test model, locate MiniLM."""
    from stages.services.models import prepare_models

    for name, path in prepare_models().items():
        console.print(f"{name}: {path}")


@data_app.command("prepare")
def data_prepare():
    """Fetch the vaderSentiment source archive's labelled snippets into the cache (once)."""
    from stages.data import sources

    folder = sources.prepare_data()
    for name in sources.CORPORA:
        console.print(f"{name}: {sources.corpus_path(name)}")
    console.print(f"cache: {folder}")


@app.command()
def server(host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
           port: int = typer.Option(4200, help="Port of the API and the UI.")):
    """Start the Prefect server and UI on HOST:PORT with the project's quiet, offline settings."""
    url = f"http://{host}:{port}"
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] the Prefect server has no authentication: whoever reaches {host}:{port} "
                      "can run any config, and a config can name Python callables (set ALIGN_ALLOWED_CALLABLES "
                      "where flows run; see docs/reliability.md)", highlight=False)
    console.print(f"Prefect UI: {url}  (PREFECT_HOME={os.environ['PREFECT_HOME']})")
    console.print(f"then, in another shell: align serve [CONFIG ...]{'' if port == 4200 else f' --port {port}'}"
                  f"  (or PREFECT_API_URL={url}/api align run CONFIG)")
    # The UI finds the API through these (`prefect server start --port` alone leaves the UI on 4200).
    os.environ.update({"PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port),
                       "PREFECT_UI_API_URL": f"{url}/api"})
    os.environ.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")
    os.execv(sys.executable, [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)])


@app.command()
def deploy(
    configs: list[Path] = typer.Argument(..., help="Configs to deploy (each also gets its generic Run form)."),
    pool: str = typer.Option(..., "--pool", help="Work pool the flow runs go to (created as a process pool if missing)."),
    cron: Optional[str] = typer.Option(None, help="Schedule rounds by cron ('0 * * * *'); each run adds one round."),
    interval: Optional[int] = typer.Option(None, help="Schedule rounds every SECONDS; each run adds one round."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root the deployments default to (shared by every "
                                                       "worker: s3://bucket/prefix for several machines)."),
    port: int = typer.Option(4200, help="Port of `align server` (used when PREFECT_API_URL is not set)."),
    heartbeat: int = typer.Option(30, help="Seconds between a flow run's heartbeats; a run silent for three is "
                                           "marked Crashed (its worker died)."),
):
    """Register the flows as deployments on Prefect work pools; `prefect worker start --pool NAME` on
    any machine runs them (stages placed by the config's `pools:` run on their own pools' workers)."""
    from flows.serve import Schedule, deploy as deploy_flows

    deploy_flows(list(configs), pool, artifacts, Schedule(cron, interval), port, heartbeat, echo=console.print)


@app.command()
def serve(
    configs: Optional[list[Path]] = typer.Argument(None, help="Configs to deploy with their path filled in."),
    cron: Optional[str] = typer.Option(None, help="Schedule rounds by cron ('0 * * * *'); each run adds one round."),
    interval: Optional[int] = typer.Option(None, help="Schedule rounds every SECONDS; each run adds one round."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root the deployments default to."),
    port: int = typer.Option(4200, help="Port of `align server` (used when PREFECT_API_URL is not set)."),
    debug: bool = DebugOpt,
):
    """Register deployments of the pipeline flows on the Prefect server and run what the UI triggers."""
    from flows.serve import Schedule, serve as serve_deployments

    if not debug:
        from flows.pipeline import quiet_console

        quiet_console(drop_refused=False)  # keep errors to one line; the served runs' own lines stay
    serve_deployments(list(configs or []), artifacts, Schedule(cron, interval), port,
                      echo=lambda line: console.print(line, markup=False, highlight=False))


_last_words: list[str] = []


def _say_last_words() -> None:
    for line in _last_words:
        print(line, file=sys.stderr)


def _fail(line: str, code: int) -> None:
    """Exit with `line` as stderr's last line. While Prefect's temporary server runs, the line is
    printed at exit, after Prefect's own exit handlers (the server says "Stopping temporary server"
    and ships the run's last logs then)."""
    server = sys.modules.get("prefect.server.api.server")
    if server is not None and getattr(server.SubprocessASGIServer, "_instances", None):
        _last_words.append(line)
    else:
        print(line, file=sys.stderr)
    sys.exit(code)


def main() -> None:
    from stages.training.allocator import reexec_under_jemalloc

    reexec_under_jemalloc("flows.cli")  # returns when jemalloc is absent, off, or already loaded
    atexit.register(_say_last_words)  # before Prefect registers its own: atexit runs them in reverse
    debug = "--debug" in sys.argv or os.environ.get("ALIGN_DEBUG") == "1"
    try:
        typer.main.get_command(app).main(args=sys.argv[1:], prog_name="align", standalone_mode=False)
    # typer >= 0.22 bundles its own click: its usage errors derive from typer.TyperException, not
    # from the installed click's ClickException, so both are caught.
    except (click.exceptions.Exit, typer.Exit) as e:
        sys.exit(e.exit_code)
    except (click.ClickException, typer.TyperException) as e:
        if hasattr(e, "show"):
            e.show()  # the usage line and the error (or, for `align` alone, the help)
        sys.exit(2)
    except (click.exceptions.Abort, typer.Abort):
        sys.exit(130)
    except BadInput as e:
        if debug:
            traceback.print_exc()
        _fail(f"align: error: {e}", 2)
    except Exception as e:  # a failure while running
        if debug:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        _fail(f"align: failed: {type(e).__name__}: {first}", 1)


if __name__ == "__main__":
    main()
