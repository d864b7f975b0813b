"""Bad input, table-driven: each case runs `align` in this process (flows.cli.main, as the console
script does) against an artifact root that already holds a complete experiment, and must exit 2
with one `align: error:` line (or click's usage message) naming the bad thing, and leave every
byte under the root as it was."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SMOKE, needs_prepared
from flows import cli

CASES = [
    # CLI usage: click's messages, exit 2 (typer bundles its own click).
    (["run", "{smoke}", "--artifact", "{root}"], "No such option: --artifact"),
    (["stage", "train"], "Missing option '--config'"),
    (["nope"], "No such command 'nope'"),
    (["run"], "Missing argument 'config'"),
    (["report"], "Missing argument 'experiments'"),
    # Configs.
    (["run", "{cfg:experiment: x\ntrain: [oops\n}", "--artifacts", "{root}"], "malformed YAML"),
    (["run", "{cfg:experiment: x\ntrain:\n  learning_rte: 1e-5\n}", "--artifacts", "{root}"], "unknown key 'train.learning_rte'"),
    (["run", "{smoke}", "--set", "train.epochs=two", "--artifacts", "{root}"], "train.epochs"),
    (["run", "{smoke}", "--set", "rounds=0", "--artifacts", "{root}"], "rounds"),
    (["run", "{smoke}", "--set", "pools={nope: gpu}", "--artifacts", "{root}"], "pools"),
    (["run", "{smoke}", "--set", "pools={train: 'a b'}", "--artifacts", "{root}"], "pools.train"),
    (["run", "{smoke}", "--set", "train.processes=0", "--artifacts", "{root}"], "train.processes"),
    (["run", "{smoke}", "--set", "sample.shards=0", "--artifacts", "{root}"], "sample.shards"),
    (["run", "{smoke}", "--set", "train.model=/no/such/model", "--artifacts", "{root}"], "/no/such/model"),
    (["run", "{smoke}", "--set", "load_prompts.source=/no/such/data.jsonl", "--artifacts", "{root}"], "/no/such/data.jsonl"),
    (["run", "{smoke}", "--set", "load_prompts.source={tmp}", "--artifacts", "{root}"], "is a folder with no data files for load_dataset"),
    (["run", "{smoke}", "--set", "load_prompts.source=/proc/self/mem", "--artifacts", "{root}"], "cannot read /proc/self/mem"),
    # root may write anywhere os.access asks about; /proc and /sys still refuse
    (["run", "{smoke}", "--no-prefect", "--artifacts", "/proc/align-root"], "artifact root /proc/align-root: /proc is not writable"),
    (["run", "{smoke}", "--no-prefect", "--artifacts", "/sys/kernel/align"], "/sys/kernel is not writable"),
    (["run", "{smoke}", "--set", "train.learning_rate=.inf", "--artifacts", "{root}"], "train.learning_rate': Input should be a finite number"),
    (["run", "{smoke}", "--set", "train.max_grad_norm=.nan", "--artifacts", "{root}"], "train.max_grad_norm': Input should be a finite number"),
    (["run", "{cfg:}", "--artifacts", "{root}"], "the config is empty"),
    (["run", "{cfg:experiment: x\ntrain: {epochs: 1}\ntrain: {epochs: 2}\n}", "--artifacts", "{root}"], "key 'train' is given twice"),
    (["run", "{bytes:experiment: caf\xe9\n}", "--artifacts", "{root}"], "not UTF-8 text"),
    (["run", "{smoke}", "--experiment", "x" * 300, "--artifacts", "{root}"], "'experiment'"),
    (["run", "{smoke}", "--experiment", "../escape", "--artifacts", "{root}"], "'experiment'"),
    (["run", "{smoke}", "--artifacts", "{root}/smoke/round-0/train/manifest.json"], "is a file, not a folder"),
    (["run", "{smoke}", "--artifacts", "nope://bucket/x"], "not a file system fsspec knows"),
    (["report", "smoke", "--artifacts", "nope://bucket/x"], "not a file system fsspec knows"),
    (["stage", "train", "--config", "{smoke}", "--round", "-1", "--artifacts", "{root}"], "--round"),
    (["run", "{smoke}", "--no-prefect", "--set", "load_prompts.source={data:nan_score}", "--artifacts", "{root}"], "holds nan in row 1"),
    (["run", "{smoke}", "--no-prefect", "--set", "load_prompts.source={data:id_completion}", "--artifacts", "{root}"], "must hold text (row 0 is list"),
    (["run", "{smoke}", "--no-prefect", "--set", "train.model={model:bad_config}", "--artifacts", "{root}"], "cannot be loaded"),
    (["run", "{smoke}", "--no-prefect", "--set", "train.model={model:bad_weights}", "--artifacts", "{root}"], "cannot be"),
    (["run", "{smoke}", "--set", "train.model={model:no_config}", "--artifacts", "{root}"], "config.json"),
    (["run", "{cfg:extends: nosuch.yaml\nexperiment: x\n}", "--artifacts", "{root}"], "config file does not exist"),
    (["run", "{smoke}", "--set", "train.epochs", "--artifacts", "{root}"], "train.epochs"),
    (["run", "{smoke}", "--force", "nosuch", "--artifacts", "{root}"], "nosuch"),
    (["run", "{smoke}", "--set", "stages=[load_prompts, nope]", "--artifacts", "{root}"], "stages"),
    (["run", "{smoke}", "--set", "train.objective=nope", "--artifacts", "{root}"], "train.objective"),
    (["run", "{smoke}", "--set", "annotate.steps=[{kind: nope}]", "--artifacts", "{root}"], "annotate.steps"),
    (["serve", "{smoke}", "--interval", "0"], "--interval: must be at least 1 second"),
    (["serve", "{smoke}", "--cron", "not a cron"], "not a cron expression"),
    (["deploy", "{smoke}", "--pool", "a b"], "--pool 'a b': not a work pool name"),
    (["deploy", "{smoke}", "--pool", "a", "--heartbeat", "5"], "--heartbeat 5: must be at least 30 seconds"),
    (["report", "smoke", "--artifacts", "{root}", "--out", "/no/such/dir/x.png"], "/no/such/dir does not exist"),
    (["inspect", "{root}/smoke/round-0/train/manifest.json"], "no experiment artifacts under"),
    # Artifacts and inputs.
    (["stage", "sample", "--config", "{smoke}", "--artifacts", "{root}"], "stage 'sample' is not part of"),
    (["report", "nosuch", "--artifacts", "{root}"], "experiment nosuch has no evaluated round"),
    (["inspect", "{root}/nosuch"], "no experiment artifacts under"),
]


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def complete_root(tmp_path_factory) -> Path:
    """An artifact root holding a complete `smoke` experiment."""
    from stages.config import load_config
    from stages.pipeline.runner import run_flow_locally
    from stages.pipeline.store import ArtifactStore

    from stages.pipeline.lock import experiment_lock

    root = tmp_path_factory.mktemp("complete") / "artifacts"
    with experiment_lock(str(root), "smoke"):  # as every run does (it leaves the lock file)
        run_flow_locally(load_config(SMOKE), ArtifactStore(str(root)))
    return root


def data_file(kind: str, tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / f"{kind}.parquet"
    rows = {"nan_score": {"prompt": ["a", "b"], "completion": [" x", " y"], "score": [1.0, float("nan")]},
            "id_completion": {"prompt": ["a", "b"], "completion": [[1, 2], [3]]}}[kind]
    pq.write_table(pa.table(rows), path)
    return path


def model_folder(kind: str, tmp: Path) -> Path:
    """A copy of the tiny model broken one way."""
    import shutil

    from stages.services.models import build_tiny_llama

    path = tmp / kind
    shutil.copytree(build_tiny_llama(), path)
    if kind == "bad_config":
        (path / "config.json").write_text("{not json")
    elif kind == "bad_weights":
        (path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    elif kind == "no_config":
        (path / "config.json").unlink()
    return path


def expand(args: list[str], root: Path, tmp: Path) -> list[str]:
    out = []
    for a in args:
        if a.startswith("{cfg:") or a.startswith("{bytes:"):
            path = tmp / f"config-{len(out)}.yaml"
            text = a[a.index(":") + 1:-1]
            path.write_bytes(text.encode("latin-1") if a.startswith("{bytes:") else text.encode())
            a = str(path)
        for kind in ("nan_score", "id_completion"):
            a = a.replace(f"{{data:{kind}}}", str(data_file(kind, tmp))) if f"{{data:{kind}}}" in a else a
        for kind in ("bad_config", "bad_weights", "no_config"):
            a = a.replace(f"{{model:{kind}}}", str(model_folder(kind, tmp))) if f"{{model:{kind}}}" in a else a
        out.append(a.replace("{smoke}", str(SMOKE)).replace("{root}", str(root)).replace("{tmp}", str(tmp)))
    return out


@needs_prepared
@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_exits_2_names_the_thing_and_changes_nothing(complete_root, tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.setenv("ALIGN_MALLOC", "system")  # main() would re-exec this process under jemalloc
    monkeypatch.chdir(ROOT)
    before = tree(complete_root)
    monkeypatch.setattr(sys, "argv", ["align", *expand(args, complete_root, tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert expected in err, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("align: ")]
    assert len(errors) <= 1, err
    assert tree(complete_root) == before, "a refused input changed the artifact root"


@needs_prepared
def test_a_run_that_fails_half_way_leaves_what_the_old_inputs_built_marked_stale(tmp_path, monkeypatch, capsys):
    """load_prompts takes the new data, build_pool refuses it: the experiment's later stages were
    built on the old load_prompts, and `inspect` says so instead of calling them complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.config import load_config
    from stages.pipeline.runner import run_flow_locally
    from stages.pipeline.store import ArtifactStore

    root = tmp_path / "artifacts"
    run_flow_locally(load_config(SMOKE), ArtifactStore(str(root)))
    data = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": ["The film", "A story"], "completion": ["", "  "]}), data)
    monkeypatch.setenv("ALIGN_MALLOC", "system")
    monkeypatch.setattr(cli.console, "width", 300)  # one table row per line
    for argv, code in ((["run", str(SMOKE), "--no-prefect", "--artifacts", str(root), "--set", f"load_prompts.source={data}",
                         "--set", "load_prompts.min_completion_words=0", "--set", "load_prompts.heldout_fraction=0"], 2),
                       (["inspect", str(root / "smoke")], 0)):
        monkeypatch.setattr(sys, "argv", ["align", *argv])
        try:
            cli.main()
            exit_code = 0
        except SystemExit as e:
            exit_code = e.code
        assert exit_code == code
    out = capsys.readouterr()
    assert "2 of 2 rows have an empty completion" in out.err
    lines = {line.split("│")[2].strip(): line for line in out.out.splitlines() if line.count("│") > 3}
    assert "complete" in lines["load_prompts"]
    assert "stale: input load_prompts was re-run" in lines["build_pool"]
    assert "stale: input load_prompts was re-run (under build_pool)" in lines["train"]
