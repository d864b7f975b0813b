"""load_prompts: a dataset mapped to our column names, filtered, deduplicated and split.

Output columns: prompt_id (a hash of the prompt), prompt, completion, rejected and score (each may
be null), split ("train" or "heldout"), and prompt_ids / completion_ids where the source has them
(a table of sampled rows: later stages then train the ids the policy drew). Texts are kept exactly
as the data gives them; where this stage cuts one text into prompt and completion (the snippet
corpora's first words), the space between them stays on the completion's side. Preference datasets in the usual hub schemas (`format`:
hh_rlhf, ultrafeedback, tldr_preference, pairs) map to prompt / completion (chosen) / rejected.
The split is decided by a seeded hash of the prompt, so it is stable across runs and a prompt
never lands on both sides.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pyarrow as pa

from stages.data import sources, tables
from stages.config import LoadPromptsConfig
from stages.pipeline.context import StageOutput, stage
from stages.pipeline.errors import BadInput
from stages.pipeline.seeds import seeded_unit

OUR_COLUMNS = ("prompt", "completion", "score", "prompt_ids", "completion_ids")
SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("rejected", pa.string()),
    ("score", pa.float64()),
    ("split", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
])


DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".txt")  # what load_dataset reads from a folder


def _is_dataset_folder(source: str) -> bool:
    """A local folder in a hub dataset's layout (data files, optionally a README with configs):
    read by `datasets.load_dataset` as the hub copy would be."""
    return "://" not in source and Path(source).expanduser().is_dir()


def _is_local_file(source: str) -> bool:
    """A file path or URL; anything else that is not a built-in corpus or a folder is a hub dataset name ("org/name")."""
    return (source.endswith((".parquet", ".pq", ".jsonl", ".json", ".ndjson", ".csv")) or "://" in source
            or source.startswith(("/", ".", "~")) or Path(source).exists())


def _hub_offline() -> bool:
    from stages.services.models import hub_offline

    return hub_offline() or os.environ.get("HF_DATASETS_OFFLINE") == "1"


def _hub_commit(cfg: LoadPromptsConfig) -> str | None:
    """The commit `revision` (default: the main branch) of a hub dataset resolves to; None offline."""
    if _hub_offline():
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(cfg.source, revision=cfg.revision).sha
    except Exception as e:  # the hub's errors are long; keep the first line
        raise BadInput(f"load_prompts.source: cannot resolve hub dataset '{cfg.source}' at revision "
                       f"{cfg.revision or 'main'}: {str(e).splitlines()[0]}") from None


def _chat_tokenizer(cfg: LoadPromptsConfig):
    """The policy's tokenizer where conversational rows are rendered with its chat template, else None."""
    if cfg.format == "plain" or cfg.chat_template == "none" or not cfg.tokenizer:
        return None
    from stages.services.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(cfg.tokenizer, "load_prompts.tokenizer"))
    return tokenizer if getattr(tokenizer, "chat_template", None) else None


def identity(cfg: LoadPromptsConfig) -> dict:
    """The data itself enters the fingerprint: an edited source file or folder, or a hub dataset
    that moved to a new commit, re-runs the stage; so does the policy's chat template where it renders."""
    tokenizer = _chat_tokenizer(cfg)
    template = {"chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()} if tokenizer else {}
    if cfg.source in sources.CORPORA:
        path = sources.corpus_path(cfg.source)
        return {"corpus": cfg.source, "bytes": path.stat().st_size if path.exists() else None}
    if _is_dataset_folder(cfg.source):
        folder = Path(cfg.source).expanduser()
        if not any(p.suffix in DATA_SUFFIXES for p in folder.rglob("*") if p.is_file()):
            raise BadInput(f"load_prompts.source: {cfg.source} is a folder with no data files for load_dataset "
                           f"({', '.join(DATA_SUFFIXES)})")
        return {"folder_sha256": tables.folder_sha256(cfg.source), **template}
    if _is_local_file(cfg.source):
        digest = tables.file_sha256(cfg.source, "load_prompts.source")
        if digest is None:
            raise BadInput(f"load_prompts.source: file not found: {cfg.source}")
        return {"file_sha256": digest, **template}
    return {"hub_dataset": cfg.source, "commit": _hub_commit(cfg), **template}


def _from_corpus(cfg: LoadPromptsConfig) -> list[dict]:
    rows = []
    for r in sources.read_corpus(cfg.source).to_pylist():
        words = r["text"].split()
        if cfg.prompt_words:
            # the space between the two stays on the completion's side: " rest of the review"
            rest = words[cfg.prompt_words:]
            prompt, completion = " ".join(words[: cfg.prompt_words]), "".join(" " + w for w in rest)
        else:
            prompt, completion = " ".join(words), None
        rows.append({"prompt": prompt, "completion": completion, "rejected": None, "score": r["valence"]})
    return rows


def _from_table(table: pa.Table, cfg: LoadPromptsConfig) -> list[dict]:
    if cfg.format != "plain":
        from stages.data.preference_formats import to_pairs

        pairs = to_pairs(table, cfg.format, cfg.source, tokenizer=_chat_tokenizer(cfg))
        return [{"prompt": r["prompt"], "completion": r["chosen"], "rejected": r["rejected"], "score": None,
                 "prompt_ids": None, "completion_ids": None} for r in pairs]
    unknown = set(cfg.columns) - set(OUR_COLUMNS)
    if unknown:
        raise BadInput(f"load_prompts.columns: unknown column '{sorted(unknown)[0]}' (ours: {', '.join(OUR_COLUMNS)})")
    mapping = {ours: cfg.columns.get(ours, ours) for ours in OUR_COLUMNS}
    if mapping["prompt"] not in table.column_names:
        raise BadInput(f"{cfg.source}: missing required column '{mapping['prompt']}' (mapped to prompt); "
                       f"columns are {', '.join(table.column_names)}")
    for ours in OUR_COLUMNS[1:]:
        if ours in cfg.columns and cfg.columns[ours] not in table.column_names:
            raise BadInput(f"{cfg.source}: missing column '{cfg.columns[ours]}' (mapped to {ours})")
    for ours in ("prompt_ids", "completion_ids"):
        theirs = mapping[ours]
        if theirs in table.column_names:
            kind = table.schema.field(theirs).type
            if not ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)):
                raise BadInput(f"{cfg.source}: column '{theirs}' (mapped to {ours}) must hold lists of token ids, "
                               f"it holds {kind}")
    n = table.num_rows
    cols = {ours: table.column(theirs).to_pylist() if theirs in table.column_names else [None] * n
            for ours, theirs in mapping.items()}
    rows = []
    for i in range(n):
        prompt = cols["prompt"][i]
        if prompt is not None and not isinstance(prompt, str):
            raise BadInput(f"{cfg.source}: column '{mapping['prompt']}' must hold text (row {i} is {type(prompt).__name__})")
        score = cols["score"][i]
        try:
            score = None if score is None else float(score)
        except (TypeError, ValueError):
            raise BadInput(f"{cfg.source}: column '{mapping['score']}' must be numeric (row {i}: {score!r})") from None
        if score is not None and not math.isfinite(score):  # a NaN would be labelled against a NaN median
            raise BadInput(f"{cfg.source}: column '{mapping['score']}' holds {score} in row {i} (use null for "
                           "a missing score)")
        completion = cols["completion"][i]
        if completion is not None and not isinstance(completion, str):
            raise BadInput(f"{cfg.source}: column '{mapping['completion']}' must hold text (row {i} is "
                           f"{type(completion).__name__}; token ids go in a completion_ids column)")
        ids = {k: cols[k][i] for k in ("prompt_ids", "completion_ids")}
        if (ids["prompt_ids"] is None) != (ids["completion_ids"] is None) or (ids["prompt_ids"] is not None
                                                                                and completion is None):
            raise BadInput(f"{cfg.source}: row {i} needs prompt_ids, completion_ids and completion together "
                           f"(columns '{mapping['prompt_ids']}', '{mapping['completion_ids']}')")
        rows.append({"prompt": prompt, "completion": None if completion is None else str(completion),
                     "rejected": None, "score": score, **ids})
    return rows


def _from_datasets(cfg: LoadPromptsConfig, commit: str | None = None) -> list[dict]:
    """A hub dataset (at `commit`, as the identity resolved it) or a local dataset folder, through
    `datasets.load_dataset` with the section's name, data_dir and split."""
    import datasets

    local = _is_dataset_folder(cfg.source)
    if not local and _hub_offline():
        raise BadInput(f"load_prompts.source: '{cfg.source}' is neither a built-in corpus nor an existing file, "
                       "and the hub is offline (set HF_HUB_OFFLINE=0 where it is reachable)")
    what = "dataset folder" if local else "hub dataset"
    try:
        ds = datasets.load_dataset(str(Path(cfg.source).expanduser()) if local else cfg.source, name=cfg.name,
                                   data_dir=cfg.data_dir, split=cfg.hub_split,
                                   revision=None if local else commit or cfg.revision)
    except Exception as e:  # datasets' errors are long; keep the first line
        raise BadInput(f"load_prompts.source: cannot load {what} '{cfg.source}': {str(e).splitlines()[0]}") from None
    return _from_table(ds.with_format("arrow")[:], cfg)


def read_source(cfg: LoadPromptsConfig, commit: str | None = None) -> list[dict]:
    if cfg.source in sources.CORPORA:
        return _from_corpus(cfg)
    if _is_dataset_folder(cfg.source):
        return _from_datasets(cfg)
    if _is_local_file(cfg.source):
        return _from_table(tables.read_table_file(cfg.source, field="load_prompts.source"), cfg)
    return _from_datasets(cfg, commit)


# once: later rounds read round 0's prompts
@stage("load_prompts", version="3", identity=identity, once=True)
def run(ctx, cfg: LoadPromptsConfig) -> StageOutput:
    commit = ctx.identity.get("commit")
    rows = read_source(cfg, commit)
    n_read = len(rows)
    kept, seen = [], set()
    for r in rows:
        prompt = r["prompt"] or ""  # as given: its whitespace is part of the text the model sees
        if not (cfg.min_prompt_chars <= len(prompt.strip()) <= cfg.max_prompt_chars):
            continue
        if cfg.min_completion_words and len((r["completion"] or "").split()) < cfg.min_completion_words:
            continue
        if cfg.min_abs_score is not None and (r["score"] is None or abs(r["score"]) < cfg.min_abs_score):
            continue
        key = {"prompt": prompt, "row": (prompt, r["completion"], r["rejected"], r["score"]), "none": None}[cfg.dedupe]
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        kept.append({**r, "prompt": prompt})
    if not kept:
        raise BadInput(f"load_prompts: no rows left from {cfg.source} after filtering ({n_read} read)")

    for r in kept:
        r["prompt_id"] = hashlib.sha1(r["prompt"].encode()).hexdigest()[:12]
        r["split"] = "heldout" if seeded_unit(ctx.seed, r["prompt"]) < cfg.heldout_fraction else "train"
        r["_order"] = seeded_unit(ctx.seed + 1, f"{r['prompt']}\x00{r['completion']}\x00{r['rejected']}")
    out = []
    for split in ("train", "heldout"):
        part = sorted((r for r in kept if r["split"] == split), key=lambda r: r["_order"])
        out.extend(part[: cfg.max_rows] if cfg.max_rows else part)
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in out], schema=SCHEMA)
    counts = {s: sum(r["split"] == s for r in out) for s in ("train", "heldout")}
    ctx.log.info("load_prompts: %d read, %d kept, %d train / %d held out", n_read, len(kept), counts["train"], counts["heldout"])
    return StageOutput(table, {"read": n_read, "kept": len(kept), **{f"rows_{k}": v for k, v in counts.items()},
                               **({"commit": commit} if commit else {})})
