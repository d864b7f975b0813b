"""load_prompts and build_pool on small local files in the formats users bring."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.config import validate_config
from stages.pipeline.errors import BadInput
from stages.pipeline.runner import run_stage
from stages.pipeline.store import ArtifactStore

QUESTIONS = [f"question number {i} about movies" for i in range(40)]


def config(source, **load_prompts):
    return validate_config({"experiment": "lp", "stages": ["load_prompts", "build_pool"],
                            "load_prompts": {"source": str(source), **load_prompts}})


def table_of(store, stage="load_prompts"):
    return store.read_table(store.stage_dir("lp", 0, stage)).to_pylist()


@pytest.fixture
def files(tmp_path):
    rows = [{"question": q, "answer": f"answer {i}", "rating": float(i % 5)} for i, q in enumerate(QUESTIONS)]
    rows.append(dict(rows[0]))  # a duplicate prompt
    paths = {"parquet": tmp_path / "d.parquet", "jsonl": tmp_path / "d.jsonl", "csv": tmp_path / "d.csv"}
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["csv"].write_text("question,answer,rating\n" + "".join(f"{r['question']},{r['answer']},{r['rating']}\n" for r in rows))
    return paths


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_local_files_with_column_mapping(files, tmp_path, fmt):
    store = ArtifactStore(str(tmp_path / "a"))
    cfg = config(files[fmt], columns={"prompt": "question", "completion": "answer", "score": "rating"},
                 heldout_fraction=0.25)
    run_stage(cfg, "load_prompts", 0, store)
    rows = table_of(store)
    assert len(rows) == 40  # the duplicate is gone
    assert {r["prompt"] for r in rows} == set(QUESTIONS)
    assert all(r["completion"].startswith("answer") and r["score"] is not None for r in rows)
    heldout = {r["prompt"] for r in rows if r["split"] == "heldout"}
    assert 0 < len(heldout) < 40
    # The split is a pure function of seed and prompt: the same across formats and runs.
    other = ArtifactStore(str(tmp_path / "b"))
    run_stage(config(files["parquet"], columns={"prompt": "question", "completion": "answer", "score": "rating"},
                     heldout_fraction=0.25), "load_prompts", 0, other)
    assert heldout == {r["prompt"] for r in table_of(other) if r["split"] == "heldout"}
    run_stage(cfg, "build_pool", 0, store)
    pool = table_of(store, "build_pool")
    assert len(pool) == 40 and all(r["generation1_weight"] == 1.0 for r in pool)


def test_filters_and_caps(files, tmp_path):
    store = ArtifactStore(str(tmp_path))
    run_stage(config(files["parquet"], columns={"prompt": "question", "score": "rating"}, min_abs_score=3,
                     max_rows=5, heldout_fraction=0.0), "load_prompts", 0, store)
    rows = table_of(store)
    assert len(rows) == 5 and all(r["score"] >= 3 for r in rows)


def test_builtin_movie_snippets_pairs(tmp_path):
    pytest.importorskip("stages.data.sources").corpus_path("movie_snippets").exists() or pytest.skip("data not prepared")
    store = ArtifactStore(str(tmp_path))
    cfg = validate_config({"experiment": "lp", "stages": ["load_prompts", "build_pool"],
                           "load_prompts": {"prompt_words": None, "min_abs_score": 0.5, "max_rows": 200},
                           "build_pool": {"kind": "reward_pairs", "min_score_gap": 1.0}})
    run_stage(cfg, "load_prompts", 0, store)
    run_stage(cfg, "build_pool", 0, store)
    pairs = table_of(store, "build_pool")
    assert pairs and all(p["generation1_reward"] - p["generation2_reward"] >= 1.0 for p in pairs)
    texts = [p["generation1"] for p in pairs] + [p["generation2"] for p in pairs]
    assert len(texts) == len(set(texts)), "each snippet is used once"


@pytest.mark.parametrize("case, expected", [
    ("missing_file", "load_prompts.source: file not found"),
    ("missing_column", "missing required column 'query' (mapped to prompt)"),
    ("empty", "is empty"),
    ("no_rows_left", "no rows left"),
    ("text_score", "column 'answer' must be numeric"),
])
def test_bad_data_is_one_line_and_writes_nothing(files, tmp_path, case, expected):
    from stages.pipeline.runner import preflight

    source, columns, extra = files["parquet"], {"prompt": "question"}, {}
    if case == "missing_file":
        source = tmp_path / "nope.parquet"
    elif case == "missing_column":
        columns = {"prompt": "query"}
    elif case == "empty":
        source = tmp_path / "empty.jsonl"
        source.write_text("")
    elif case == "no_rows_left":
        extra = {"min_prompt_chars": 1000}
    elif case == "text_score":
        columns = {"prompt": "question", "score": "answer"}
    store_root = tmp_path / "art"
    cfg = config(source, columns=columns, **extra)
    with pytest.raises(BadInput) as e:
        preflight(cfg)
        run_stage(cfg, "load_prompts", 0, ArtifactStore(str(store_root)))
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not store_root.exists() or list(store_root.iterdir()) == []


def test_hub_source_is_refused_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match="hub is offline"):
        run_stage(config("stanfordnlp/imdb"), "load_prompts", 0, ArtifactStore(str(tmp_path)))


@pytest.mark.parametrize("hub, datasets", [(None, "1"), ("1", "1"), ("0", "0")])
def test_opting_into_the_hub_opens_it_for_datasets_too(hub, datasets):
    """HF_HUB_OFFLINE=0, the one documented switch, lets hub datasets load as well as models;
    unset, both stay offline."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    if hub is not None:
        env["HF_HUB_OFFLINE"] = hub
    out = subprocess.run([sys.executable, "-c", "import os, flows; print(os.environ['HF_DATASETS_OFFLINE'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == datasets


@pytest.mark.parametrize("name", ["nlf_tldr", "quark_tldr"])
def test_tldr_config_loader_on_a_local_file_of_its_schema(tmp_path, name):
    """nlf_tldr.yaml and quark_tldr.yaml read trl-lib/tldr from the hub; the same mapping works on a local file."""
    from stages.config import load_config
    from stages.pipeline.paths import PROJECT_ROOT

    posts = [{"prompt": f"SUBREDDIT: r/movies\n\nTITLE: Post {i}\n\nPOST: I watched film {i} last night and "
                        f"could not stop thinking about it.\n\nTL;DR:", "completion": f" film {i} stuck with me"}
             for i in range(30)]
    path = tmp_path / "tldr.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in posts))
    cfg = load_config(PROJECT_ROOT / f"configs/{name}.yaml", [f"load_prompts.source={path}", "stages=[load_prompts]"])
    store = ArtifactStore(str(tmp_path / "a"))
    run_stage(cfg, "load_prompts", 0, store)
    rows = store.read_table(store.stage_dir(name, 0, "load_prompts")).to_pylist()
    assert len(rows) == 30 and all(r["prompt"].endswith("TL;DR:") and r["completion"] == f" film {r['prompt'].split()[4]} stuck with me" for r in rows)


def test_hh_rlhf_file_becomes_pairs_and_pointwise_records(tmp_path):
    rows = [{"chosen": f"\n\nHuman: Recommend film {i}?\n\nAssistant: Sure, try Casablanca.",
             "rejected": f"\n\nHuman: Recommend film {i}?\n\nAssistant: No."} for i in range(20)]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = ArtifactStore(str(tmp_path / "a"))
    cfg = validate_config({"experiment": "lp", "stages": ["load_prompts", "build_pool"],
                           "load_prompts": {"source": str(path), "format": "hh_rlhf", "heldout_fraction": 0.2},
                           "build_pool": {"kind": "pairs"}})
    run_stage(cfg, "load_prompts", 0, store)
    run_stage(cfg, "build_pool", 0, store)
    pool = table_of(store, "build_pool")
    assert len(pool) == 20
    assert all(p["prompt"].endswith("Assistant:") and p["generation1"] == " Sure, try Casablanca." and p["generation2"] == " No."
               for p in pool)
    cfg = validate_config({**cfg.model_dump(), "build_pool": {"kind": "pointwise"}})
    run_stage(cfg, "build_pool", 0, store)
    points = table_of(store, "build_pool")
    assert len(points) == 40 and sum(p["desirable"] for p in points) == 20
    assert all(p["kl_generation"] is not None for p in points)
