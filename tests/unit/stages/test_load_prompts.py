"""load_prompts and build_pool on small local files in the formats users bring."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import needs_prepared
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
                           "load_prompts": {"source": str(path), "format": "hh_rlhf", "heldout_fraction": 0.2,
                                            "chat_template": "none"},
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


# --- hub datasets: subsets, folders, revisions; chat templates -----------------------------------

HH = [{"chosen": f"\n\nHuman: Recommend film {i}?\n\nAssistant: Sure, try Casablanca.",
       "rejected": f"\n\nHuman: Recommend film {i}?\n\nAssistant: No."} for i in range(12)]


def hub_folder(root):
    """A local copy of a dataset in the hub's layout: hh-rlhf's data_dir subsets, and a README whose
    YAML declares a configuration ("tiny") of its own, as load_dataset reads it from the hub."""
    for sub, rows in {"harmless-base": HH[:8], "helpful-base": HH[8:]}.items():
        (root / sub).mkdir(parents=True)
        (root / sub / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: '*-base/train.jsonl'\n- config_name: tiny\n  data_files:\n"
                                    "  - split: train\n    path: helpful-base/train.jsonl\n---\n")
    return root


@pytest.mark.parametrize("subset, expected", [({}, 12), ({"data_dir": "harmless-base"}, 8), ({"name": "tiny"}, 4)])
def test_a_dataset_folder_reads_through_datasets_with_name_and_data_dir(tmp_path, subset, expected):
    folder = hub_folder(tmp_path / "hh-rlhf")
    cfg = config(folder, format="hh_rlhf", chat_template="none", heldout_fraction=0.0, **subset)
    store = ArtifactStore(str(tmp_path / "a"))
    run_stage(cfg, "load_prompts", 0, store)
    rows = table_of(store)
    assert len(rows) == expected and all(r["completion"] == " Sure, try Casablanca." for r in rows)


def test_a_dataset_folders_files_are_its_identity(tmp_path):
    from stages.load_prompts import identity

    folder = hub_folder(tmp_path / "hh-rlhf")
    cfg = config(folder, format="hh_rlhf", chat_template="none").load_prompts
    before = identity(cfg)
    (folder / "helpful-base" / "train.jsonl").write_text(json.dumps(HH[0]) + "\n")
    assert identity(cfg) != before and set(before) == {"folder_sha256"}


def test_a_hub_dataset_is_read_at_the_commit_its_identity_resolved(tmp_path, monkeypatch):
    """Online, the revision resolves to a commit (huggingface_hub's dataset_info), which enters the
    fingerprint and is the revision load_dataset reads: a moved branch re-runs the stage."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    commit = {"sha": "a" * 40}
    seen = []
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, repo, revision=None: type("Info", (), {"sha": commit["sha"]})())

    def load_dataset(path, name=None, data_dir=None, split=None, revision=None):
        seen.append((path, name, data_dir, split, revision))
        return datasets.Dataset.from_list(HH)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = config("Anthropic/hh-rlhf", format="hh_rlhf", chat_template="none", data_dir="harmless-base",
                 revision="main", hub_split="test")
    store = ArtifactStore(str(tmp_path / "a"))
    first = run_stage(cfg, "load_prompts", 0, store)
    assert seen == [("Anthropic/hh-rlhf", None, "harmless-base", "test", "a" * 40)]
    assert first.metrics["commit"] == "a" * 40
    assert run_stage(cfg, "load_prompts", 0, store).status == "skipped"
    commit["sha"] = "b" * 40  # the branch moved on the hub
    assert run_stage(cfg, "load_prompts", 0, store).status != "skipped" and seen[-1][-1] == "b" * 40


UF = [{"chosen": [{"role": "user", "content": f"Name a film about {t}."}, {"role": "assistant", "content": "Jaws."}],
       "rejected": [{"role": "user", "content": f"Name a film about {t}."}, {"role": "assistant", "content": "No idea."}],
       "score_chosen": 8.0, "score_rejected": 2.0} for t in ("sharks", "space", "trains", "ghosts", "bees", "kings")]


@needs_prepared
@pytest.mark.parametrize("fmt", ["hh_rlhf", "ultrafeedback"])
def test_a_conversation_reaches_sample_and_train_in_the_policys_chat_template(tmp_path, fmt):
    """hh-rlhf and UltraFeedback rows in the hub schema: the policy samples from exactly
    apply_chat_template(messages, add_generation_prompt=True)'s ids, and trains on those ids followed
    by the answer's and EOS (<|im_end|>, the template's end of turn); chat_template none keeps the
    plain "User: ...\\nAssistant:" text."""
    from stages.data.tokens import of_record, text_ids
    from stages.services.models import load_tokenizer, resolve_model

    rows = HH if fmt == "hh_rlhf" else UF
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    messages = {r["chosen"][:-1][0]["content"] if fmt == "ultrafeedback" else
                r["chosen"].split("Human: ")[1].split("\n\n")[0]: (r["chosen"][:-1] if fmt == "ultrafeedback" else None)
                for r in rows}
    tok = load_tokenizer(resolve_model("tiny-llama"))

    def template_ids(question):
        return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)["input_ids"]

    cfg = validate_config({
        "experiment": "lp", "stages": ["load_prompts", "sample", "build_pool", "train"],
        "load_prompts": {"source": str(tmp_path / "d.parquet"), "format": fmt, "heldout_fraction": 0.0},
        "sample": {"n": 1, "max_new_tokens": 2, "max_prompt_tokens": 128, "batch_size": 8},
        "build_pool": {"kind": "pairs"},
        "train": {"model": "tiny-llama", "objective": "dpo", "max_steps": 1, "batch_size": 2,
                  "max_prompt_length": 120, "max_length": 160}})
    store = ArtifactStore(str(tmp_path / "a"))
    for stage in ("load_prompts", "sample"):
        run_stage(cfg, stage, 0, store)
    sampled = table_of(store, "sample")
    assert len(sampled) == len(rows)
    for r in sampled:
        question = next(q for q in messages if q in r["prompt"])
        assert list(r["prompt_ids"]) == template_ids(question)

    run_stage(cfg, "build_pool", 0, store)
    pool = table_of(store, "build_pool")
    for r in pool:
        question = next(q for q in messages if q in r["prompt"])
        for generation, answer in (("generation1", r["generation1"]), ("generation2", r["generation2"])):
            seq = of_record(tok, r, generation)
            assert seq.prompt == template_ids(question)
            assert seq.completion == text_ids(tok, answer) + [tok.eos_token_id] and not answer[:1].isspace()
    assert run_stage(cfg, "train", 0, store).status == "ran"

    plain = validate_config({**cfg.model_dump(), "load_prompts": {**cfg.load_prompts.model_dump(), "chat_template": "none"}})
    run_stage(plain, "load_prompts", 0, store)
    assert all(r["prompt"].startswith(("\n\nHuman:", "User:")) for r in table_of(store))
