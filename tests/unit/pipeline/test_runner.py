"""The runner's bookkeeping on the smoke flow (tiny random Llama), without Prefect."""

import shutil
from pathlib import Path

import pytest

from conftest import SMOKE, needs_prepared
from stages.config import load_config
from stages.pipeline.errors import BadInput
from stages.pipeline.runner import run_flow_locally, run_stage
from stages.pipeline.store import ArtifactStore

pytestmark = needs_prepared


def statuses(results):
    return {r.stage: r.status for r in results}


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """One complete smoke run; tests work on copies of it."""
    root = tmp_path_factory.mktemp("done") / "artifacts"
    results = run_flow_locally(load_config(SMOKE), ArtifactStore(str(root)))
    assert set(statuses(results).values()) == {"ran"}
    return root


@pytest.fixture
def copy(done, tmp_path) -> Path:
    return Path(shutil.copytree(done, tmp_path / "artifacts"))


def test_second_run_skips_everything(copy):
    results = run_flow_locally(load_config(SMOKE), ArtifactStore(str(copy)))
    assert set(statuses(results).values()) == {"skipped"}


def test_corrupt_data_file_reruns_that_stage_and_downstream_only(copy):
    data = copy / "smoke" / "round-0" / "build_pool" / "data.parquet"
    data.write_bytes(data.read_bytes()[:-10] + b"0123456789")
    s = statuses(run_flow_locally(load_config(SMOKE), ArtifactStore(str(copy))))
    assert s == {"load_prompts": "skipped", "build_pool": "ran", "train": "ran", "evaluate": "ran"}


def test_deleted_checkpoint_reruns_train_and_evaluate(copy):
    (copy / "smoke" / "round-0" / "train" / "model" / "model.safetensors").unlink()
    s = statuses(run_flow_locally(load_config(SMOKE), ArtifactStore(str(copy))))
    assert s == {"load_prompts": "skipped", "build_pool": "skipped", "train": "ran", "evaluate": "ran"}


def test_config_change_reruns_from_the_changed_stage(copy):
    cfg = load_config(SMOKE, ["evaluate.max_records=8"])
    assert statuses(run_flow_locally(cfg, ArtifactStore(str(copy))))["evaluate"] == "ran"
    cfg = load_config(SMOKE, ["train.learning_rate=5e-4"])
    s = statuses(run_flow_locally(cfg, ArtifactStore(str(copy))))
    assert s == {"load_prompts": "skipped", "build_pool": "skipped", "train": "ran", "evaluate": "ran"}


def test_force_reruns_stage_and_downstream(copy):
    s = statuses(run_flow_locally(load_config(SMOKE), ArtifactStore(str(copy)), force=["build_pool"]))
    assert s == {"load_prompts": "skipped", "build_pool": "ran", "train": "ran", "evaluate": "ran"}
    with pytest.raises(BadInput, match="--force sample: not a stage of this flow"):
        run_flow_locally(load_config(SMOKE), ArtifactStore(str(copy)), force=["sample"])


def test_failed_stage_leaves_nothing_and_rerun_resumes_there(copy, monkeypatch):
    shutil.rmtree(copy / "smoke" / "round-0" / "train")
    shutil.rmtree(copy / "smoke" / "round-0" / "evaluate")
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    monkeypatch.setenv("ALIGN_INJECT_FAULT", "train:fail")
    with pytest.raises(RuntimeError, match="injected fault in stage train"):
        run_flow_locally(load_config(SMOKE), ArtifactStore(str(copy)))
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
    monkeypatch.delenv("ALIGN_INJECT_FAULT")
    s = statuses(run_flow_locally(load_config(SMOKE), ArtifactStore(str(copy))))
    assert s == {"load_prompts": "skipped", "build_pool": "skipped", "train": "ran", "evaluate": "ran"}


def test_single_stage_needs_its_inputs(tmp_path):
    with pytest.raises(BadInput, match=r"stage train needs build_pool \(round 0\).*run build_pool first"):
        run_stage(load_config(SMOKE), "train", 0, ArtifactStore(str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_what_a_reader_needs(done):
    import json

    import datasets

    m = json.loads((done / "smoke" / "round-0" / "train" / "manifest.json").read_text())
    for key in ("stage", "fingerprint", "inputs", "config", "rows", "schema", "files", "started", "finished",
                "wall_seconds", "peak_rss_gb", "metrics"):
        assert key in m
    assert m["inputs"]["build_pool"]["fingerprint"]
    assert m["peak_rss_gb"] > 0.1  # Linux: the process's resident peak while train ran (torch and a model loaded)
    # Provenance: this checkout's commit, the packages' versions, the machine.
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout
    p = m["provenance"]
    assert p["commit"] == head.strip() and isinstance(p["dirty"], bool)
    assert {"python", "torch", "transformers", "accelerate", "peft", "prefect", "align-workbench"} <= set(p["versions"])
    assert p["versions"]["torch"] and p["cpu"] and p["cores"] >= 1 and p["threads"] >= 1 and "gpu" in p
    assert "model/model.safetensors" in m["files"] and "model/README.md" in m["files"]
    from huggingface_hub import ModelCard

    card = ModelCard.load(done / "smoke" / "round-0" / "train" / "model" / "README.md")
    assert card.data.library_name == "transformers" and "sft" in card.data.tags
    assert "`train.objective: sft`" in card.text and f"on {m['metrics']['records']} training" in card.text
    ds = datasets.load_dataset("parquet", data_files=str(done / "smoke" / "round-0" / "build_pool" / "data.parquet"),
                               split="train")
    assert set(ds.column_names) >= {"prompt", "generation1", "generation1_weight", "split"}


def test_input_rounds_and_downstream_of_earlier_rounds():
    from stages.pipeline.registry import downstream_of, input_rounds

    assert [input_rounds(w, 3) for w in ("", "prev", "0", "earlier")] == [[3], [2], [0], [0, 1, 2]]
    assert input_rounds("prev", 0) == input_rounds("earlier", 0) == []
    # build_pool reads data_pool of this round and of every earlier one: only the first makes it downstream
    flow = ["load_prompts", "sample", "annotate", "data_pool", "build_pool", "train"]
    assert downstream_of("data_pool", flow) == ["data_pool", "build_pool", "train"]


def test_provenance_records_the_code_this_process_imported_not_where_the_checkout_moved(monkeypatch):
    """A long run's manifests name the commit its code came from, even after a commit or a pull
    moves the checkout mid-run (the modules in memory do not move with it)."""
    from stages.pipeline import provenance as prov

    before = prov.provenance()
    monkeypatch.setattr(prov, "git_state", lambda root=prov.CHECKOUT: {"commit": "0" * 40, "dirty": False})
    assert prov.provenance()["commit"] == before["commit"] == prov.CODE_STATE["commit"]
