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
    (["run"], "Missing argument 'CONFIG'"),
    (["report"], "Missing argument 'EXPERIMENTS...'"),
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

    root = tmp_path_factory.mktemp("complete") / "artifacts"
    run_flow_locally(load_config(SMOKE), ArtifactStore(str(root)))
    return root


def expand(args: list[str], root: Path, tmp: Path) -> list[str]:
    out = []
    for a in args:
        if a.startswith("{cfg:"):
            path = tmp / f"config-{len(out)}.yaml"
            path.write_text(a[5:-1])
            a = str(path)
        out.append(a.replace("{smoke}", str(SMOKE)).replace("{root}", str(root)))
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
