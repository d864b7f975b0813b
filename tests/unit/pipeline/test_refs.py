"""References to other experiments' artifacts resolve under the run's artifact root, never ./artifacts."""

import json

import pytest

from conftest import ROOT, needs_prepared
from stages.config import load_config
from stages.pipeline.errors import BadInput
from stages.pipeline.runner import preflight, run_flow_locally
from stages.pipeline.store import ArtifactStore


@needs_prepared
def test_a_source_reference_reads_the_other_experiments_table(tmp_path):
    store = ArtifactStore(str(tmp_path))
    run_flow_locally(load_config(ROOT / "configs/smoke.yaml", ["stages=[load_prompts]"], experiment="first"), store)
    ref = "load_prompts.source={experiment: first, stage: load_prompts}"
    cfg = load_config(ROOT / "configs/smoke.yaml", ["stages=[load_prompts]", ref, "load_prompts.heldout_fraction=0.5"],
                      experiment="second")
    (result,) = run_flow_locally(cfg, store)
    manifest = json.loads((tmp_path / "second/round-0/load_prompts/manifest.json").read_text())
    assert manifest["config"]["source"] == f"{tmp_path}/first/round-0/load_prompts/data.parquet"
    assert result.rows > 0


def test_a_missing_reference_is_one_line_naming_the_field(tmp_path):
    cfg = load_config(ROOT / "configs/dpo_movies.yaml")
    with pytest.raises(BadInput, match=r"^load_prompts\.source: pool_movies round 0 annotate under .*: no complete "
                                       r"artifact; run `align run configs/pool_movies.yaml` first"):
        preflight(cfg, str(tmp_path))


@needs_prepared
def test_the_default_reward_model_lives_under_the_runs_root(tmp_path):
    store = ArtifactStore(str(tmp_path))
    online = load_config(ROOT / "configs/smoke_online_dpo.yaml",
                         ["rounds=1", "stages=[load_prompts, sample, annotate]", "annotate.steps=[{kind: reward_model}]"])
    with pytest.raises(BadInput, match=r"^annotate\.steps\[0\]\.model: reward_movies round 0 train under "):
        preflight(online, str(tmp_path))  # nothing under this root yet, whatever ./artifacts holds
    run_flow_locally(load_config(ROOT / "configs/smoke_reward.yaml", experiment="reward_movies"), store)
    preflight(online, str(tmp_path))
    results = {r.stage: r for r in run_flow_locally(online, store)}
    assert results["annotate"].status == "ran"
    manifest = json.loads((tmp_path / "smoke_online_dpo/round-0/annotate/manifest.json").read_text())
    assert manifest["config"]["steps"][0]["model"] == f"{tmp_path}/reward_movies/round-0/train/model"


@needs_prepared
def test_serve_checks_references_under_the_root_it_deploys_against(tmp_path):
    """`align serve --artifacts ROOT` registers a config whose reference exists only under ROOT
    (it used to check them under ./artifacts and refuse)."""
    from flows.serve import build_deployments

    run_flow_locally(load_config(ROOT / "configs/smoke.yaml", ["stages=[load_prompts]"], experiment="first"),
                     ArtifactStore(str(tmp_path / "root")))
    cfg = tmp_path / "second.yaml"
    cfg.write_text("extends: " + str(ROOT / "configs/smoke.yaml") + "\nexperiment: second\n"
                   "load_prompts: {source: {experiment: first, stage: load_prompts}}\n")
    names = [d.name for d in build_deployments([cfg], artifacts=str(tmp_path / "root"))]
    assert "second" in names
    with pytest.raises(BadInput, match="first round 0 load_prompts under"):
        build_deployments([cfg], artifacts=str(tmp_path / "elsewhere"))
