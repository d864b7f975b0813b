"""stages/services/models.py: model references, the tiny Llama build, atomic cache folders.

Fast (seconds): nothing here converts the GGUF file. Tests that need SmolLM2's tokenizer reuse
the folder `align models prepare` wrote into the real cache, and skip if it is not there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.services import models
from stages.pipeline.errors import BadInput
from stages.pipeline.paths import cache_dir

# Read before any test points ALIGN_CACHE elsewhere.
REAL_SMOLLM2 = cache_dir() / "models" / models.SMOLLM2_DIR
needs_smollm2 = pytest.mark.skipif(
    not (REAL_SMOLLM2 / "config.json").is_file(),
    reason=f"SmolLM2 not prepared at {REAL_SMOLLM2}; run `align models prepare` first",
)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ALIGN_CACHE", str(cache))
    return cache


@pytest.fixture
def cache_with_smollm2(empty_cache) -> Path:
    """A temporary cache whose SmolLM2 folder is a link to the real prepared one."""
    (empty_cache / "models").mkdir(parents=True)
    (empty_cache / "models" / models.SMOLLM2_DIR).symlink_to(REAL_SMOLLM2, target_is_directory=True)
    return empty_cache


# ------------------------------------------------------------------ resolve_model errors


@pytest.mark.parametrize("ref", ["/no/such/model", "./no-such-model", "~/no-such-model-xyz", "a/b/c"])
def test_missing_path_is_bad_input(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match=r"policy\.model: model path does not exist: "):
        models.resolve_model(ref, field="policy.model")


def test_directory_without_config_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no config.json") as err:
        models.resolve_model(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_file_instead_of_directory_is_bad_input(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_text("x")
    with pytest.raises(BadInput, match="not a directory"):
        models.resolve_model(str(f))


def test_local_directory_with_config_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == str(tmp_path.resolve())


def test_hub_id_refused_when_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so "someorg/somemodel" cannot be a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match="offline") as err:
        models.resolve_model("someorg/somemodel", field="reward.model")
    assert "reward.model" in str(err.value) and "\n" not in str(err.value)


def test_hub_id_passed_through_when_online(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert models.resolve_model("someorg/somemodel") == "someorg/somemodel"


def test_unknown_bare_name_is_bad_input():
    with pytest.raises(BadInput, match="unknown model 'smolm2'"):
        models.resolve_model("smolm2")


def test_unprepared_smollm2_and_tiny_llama_say_how_to_fix(empty_cache):
    for ref in ("smollm2", "tiny-llama"):
        with pytest.raises(BadInput, match="align models prepare"):
            models.resolve_model(ref)


# ------------------------------------------------------------------ atomic cache folders


def test_failed_build_leaves_nothing(tmp_path):
    final = tmp_path / "models" / "thing"

    def half_then_crash(out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("crash mid-build")

    with pytest.raises(RuntimeError):
        models._build_atomically(final, False, half_then_crash)
    assert list((tmp_path / "models").iterdir()) == []  # neither `thing` nor a temp folder


def test_existing_folder_is_not_rebuilt_unless_forced(tmp_path):
    final = tmp_path / "thing"
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        out.mkdir()
        (out / "n").write_text(str(len(calls)))

    models._build_atomically(final, False, build)
    models._build_atomically(final, False, build)
    assert len(calls) == 1
    models._build_atomically(final, True, build)
    assert (final / "n").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


# ------------------------------------------------------------------ tiny llama


@needs_smollm2
def test_tiny_llama_is_deterministic(cache_with_smollm2):
    rng_before = torch.random.get_rng_state()
    path = models.build_tiny_llama()
    assert path == cache_with_smollm2 / "models" / "tiny-llama"
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    first = load_file(path / "model.safetensors")

    models.build_tiny_llama(force=True)
    second = load_file(path / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert sum(t.numel() for t in first.values()) == 3_219_776  # lm_head tied, not stored


@needs_smollm2
def test_tiny_llama_runs_with_smollm2_tokenizer(cache_with_smollm2):
    path = models.resolve_model("tiny-llama")  # builds on demand
    tok = models.load_tokenizer(path, padding_side="left")
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 2)
    assert tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    model = models.load_causal_lm(path)
    batch = tok(["hi", "a longer prompt here"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 49152 and logits.dtype == torch.float32


# ------------------------------------------------------------------ prepared SmolLM2, MiniLM, identity


@needs_smollm2
def test_prepared_smollm2_folder_is_plain_hf():
    config = json.loads((REAL_SMOLLM2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    tok = models.load_tokenizer(REAL_SMOLLM2)
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)
    assert "<|im_start|>" in tok.chat_template


def test_minilm_loads_as_one_label_classifier():
    path = models.minilm_path()
    assert (path / "config.json").is_file()
    assert models.resolve_model("minilm") == str(path)
    models.check_minilm_loads(path)


def test_model_identity_is_stable_and_tracks_config(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"0" * 10)
    first = models.model_identity(str(tmp_path))
    assert first == models.model_identity(str(tmp_path))
    assert first.startswith(f"{tmp_path.name}|config:") and "|weights:" in first
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert models.model_identity(str(tmp_path)) != first


def test_model_identity_is_the_same_for_a_copy_elsewhere(tmp_path):
    """A moved artifact store (or one resumed from another checkout) keeps its fingerprints."""
    import shutil

    (tmp_path / "a" / "m").mkdir(parents=True)
    (tmp_path / "a" / "m" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "a" / "m" / "model.safetensors").write_bytes(b"weights")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert models.model_identity(str(tmp_path / "a" / "m")) == models.model_identity(str(tmp_path / "b" / "m"))


def test_model_identity_tracks_new_weights_of_the_same_size(tmp_path):
    import os

    (tmp_path / "config.json").write_text('{"a": 1}')
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"0" * 10)
    first = models.model_identity(str(tmp_path))
    stat = weights.stat()
    weights.write_bytes(b"1" * 10)  # same shape, new values: a stale train artifact must not look complete
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert models.model_identity(str(tmp_path)) != first
