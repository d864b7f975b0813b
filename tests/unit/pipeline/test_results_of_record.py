"""The reported numbers are the runs of record's: docs/results.md is what the generator makes of
the manifests in docs/results (as `align report --artifacts docs/results --format md` reads them),
and README's headline rows are those manifests' numbers (a re-run that updates a page without
`make results`, or the reverse, fails here)."""

import pytest

from conftest import ROOT
from flows import results_page
from stages.pipeline.report import across_seeds, base_row, rounds_table, with_interval, with_spread
from stages.pipeline.store import ArtifactStore

README = (ROOT / "README.md").read_text()
STORE = ArtifactStore(str(ROOT / "docs/results"))


def cells(prefix: str, text: str) -> list[list[str]]:
    return [[c.strip().replace("**", "") for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(prefix)]


def test_the_results_page_is_generated_from_the_runs_of_record():
    assert (ROOT / "docs" / "results.md").read_text() == results_page.page(), "docs/results.md is stale: run `align docs`"


RECORDED = [run for run in results_page.RUNS if results_page.recorded(STORE, run)]


def test_every_method_of_the_frontier_is_recorded_or_named_as_not_yet_measured():
    text = results_page.page()
    assert {"Online DPO", "Quark", "NLF", "NLF, papers' loss", "Quark (pool)", "NLF (pool)", "RLOO", "GRPO"} <= {
        run.method for run in RECORDED}
    for run in results_page.RUNS:
        if run in RECORDED:
            assert f"\n## {run.method}\n" in text and f"| {run.method} | {len(run.names)} |" in text
        else:
            assert f"{run.method} (`configs/{run.config}`)" in text
        assert (ROOT / "configs" / run.config).exists()


@pytest.mark.parametrize("run", RECORDED, ids=lambda r: r.method)
def test_the_page_rows_and_readme_headline_are_the_manifests(run):
    text = results_page.page()
    runs = [rounds_table(STORE, n) for n in run.names]
    for name, rows in zip(run.names, runs):
        page_rows = cells(f"| `{name}` |", text)
        assert page_rows[0][1:3] == ["base", with_interval(base_row(rows), "base_mean_reward")]
        assert [(r[2], r[4]) for r in page_rows[1:]] == [(with_interval(m, "mean_reward"), with_interval(m, "kl_to_reference"))
                                                         for m in rows]
    (summary,) = cells(f"| {run.method} | {len(run.names)} |", text)  # the frontier table: the last round
    last = [rows[-1] for rows in runs]
    if not run.seeded:
        assert summary[3:5] == [with_interval(last[0], "reward_gain"), with_interval(last[0], "kl_to_reference")]
        assert summary[-1] == ("yes" if last[0]["reward_gain_ci_low"] > 0 else "no")  # cells() drops the bold
        return
    seeds = across_seeds(runs)
    assert len(seeds) >= 3 and summary[3:5] == [with_spread(seeds[-1], "gain"), with_spread(seeds[-1], "kl_to_reference")]
    label = {"Online DPO": "online DPO"}.get(run.method, run.method)
    (headline,) = cells(f"| {label} (3 seeds) |", README)  # round 2's gain over the base and KL, over the seeds
    assert headline[1:] == [with_spread(seeds[2], "gain"), with_spread(seeds[2], "kl_to_reference")]


def test_a_rounds_wall_time_is_its_stages_but_evaluates(tmp_path):
    import json

    def manifest(exp, k, stage, wall):
        d = tmp_path / exp / f"round-{k}" / stage
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"stage": stage, "wall_seconds": wall, "fingerprint": "f", "run_id": "r",
                                                            "rows": 1, "files": {}}))

    for k, (sample, train) in enumerate([(30.0, 60.0), (50.0, 70.0), (10.0, 20.0)]):
        manifest("online", k, "sample", sample)
        manifest("online", k, "train", train)
        manifest("online", k, "evaluate", 999.0)
    manifest("old", 0, "evaluate", 5.0)
    manifest("old", 0, "data_pool", 1.0)
    store = ArtifactStore(str(tmp_path))
    assert results_page.round_wall_seconds(store, "online") == 90.0  # median of 90, 120, 30
    assert results_page.round_wall_seconds(store, "old") is None  # only evaluate's and data_pool's were kept


def test_the_page_names_the_stages_a_run_made_at_an_older_version(tmp_path):
    import json

    from stages.pipeline.registry import stage_specs

    today = stage_specs()
    for k, train_version in enumerate(("1", today["train"].version)):
        for stage, version in (("train", train_version), ("evaluate", today["evaluate"].version)):
            d = tmp_path / "run" / f"round-{k}" / stage
            d.mkdir(parents=True)
            (d / "manifest.json").write_text(json.dumps({"stage": stage, "code_version": version, "fingerprint": "f",
                                                         "run_id": "r", "rows": 1, "files": {}}))
    store = ArtifactStore(str(tmp_path))
    assert results_page._older_stages(store, "run") == f"; stages older than today's: train v1 (today v{today['train'].version})"
    (tmp_path / "run" / "round-0" / "train" / "manifest.json").unlink()
    (tmp_path / "run" / "round-0" / "train").rmdir()
    assert results_page._older_stages(store, "run") == ""


def test_a_run_more_than_one_version_behind_or_on_another_pool_is_listed_to_make_again(tmp_path):
    import json

    from stages.pipeline.registry import stage_specs

    def manifest(experiment, stage, k=0, **fields):
        d = tmp_path / experiment / f"round-{k}" / stage
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"stage": stage, "fingerprint": "f", "run_id": "r", "rows": 1,
                                                     "files": {}, **fields}))

    train = int(stage_specs()["train"].version)
    assert train >= 3  # the cases below need two older versions
    pool = results_page.POOL
    manifest(pool, "annotate", files={"data.parquet": {"bytes": 1, "sha256": "a" * 64}})
    source = {"source": f"/x/artifacts/{pool}/round-0/annotate/data.parquet"}
    manifest("one_behind", "train", code_version=str(train - 1))
    manifest("two_behind", "train", code_version=str(train))
    manifest("two_behind", "train", k=1, code_version=str(train - 2))  # the oldest round counts
    manifest("other_pool", "load_prompts", config=source, identity={"file_sha256": "b" * 64})
    manifest("other_pool", "train", code_version=str(train))
    store = ArtifactStore(str(tmp_path))
    assert results_page.to_redo(store, "one_behind") == []
    assert results_page.to_redo(store, "two_behind") == [f"train v{train - 2} (today v{train})"]
    assert results_page.to_redo(store, "other_pool") == [f"another `{pool}`"]


def test_make_frontier_runs_every_method_of_the_page():
    makefile = (ROOT / "Makefile").read_text()
    listed = makefile.split("FRONTIER :=", 1)[1].split("\nfrontier:", 1)[0].replace("\\", " ").split()
    assert set(listed) == {run.config.removesuffix(".yaml") for run in results_page.RUNS} | {results_page.POOL}
    assert listed.index(results_page.POOL) < min(listed.index(r.config.removesuffix(".yaml")) for r in results_page.RUNS
                                                 if r in results_page.FAMILIES[1][2])  # the pool before its readers


def test_the_page_names_an_offline_run_made_on_another_pool(tmp_path):
    import json

    def manifest(experiment, stage, **fields):
        d = tmp_path / experiment / "round-0" / stage
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"stage": stage, "code_version": "1", "fingerprint": "f",
                                                     "run_id": "r", "rows": 1, "files": {}, **fields}))

    pool = results_page.POOL
    manifest(pool, "annotate", files={"data.parquet": {"bytes": 1, "sha256": "a" * 64}})
    source = {"source": f"/x/artifacts/{pool}/round-0/annotate/data.parquet"}
    manifest("same", "load_prompts", config=source, identity={"file_sha256": "a" * 64})
    manifest("other", "load_prompts", config=source, identity={"file_sha256": "b" * 64})
    manifest("online", "load_prompts", config={"source": "movie_snippets"}, identity={"file_sha256": "c" * 64})
    store = ArtifactStore(str(tmp_path))
    assert results_page._other_pool(store, "same") == ""
    assert results_page._other_pool(store, "online") == ""
    assert results_page._other_pool(store, "other") == (
        f"; trained on another `{pool}` than the one recorded here (its samples' sha256 {'b' * 12})")
