"""Reading user tables: Parquet, JSON lines or CSV, from a local path or any fsspec URL, with
one-line errors naming the config field and the file; and the content hash that enters fingerprints."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from stages.pipeline.errors import BadInput

_FORMATS = {".parquet": "Parquet", ".pq": "Parquet", ".jsonl": "JSONL", ".json": "JSONL",
            ".ndjson": "JSONL", ".csv": "CSV"}


def read_table_file(path: str, field: str = "source") -> pa.Table:
    """Read a Parquet / JSON-lines / CSV file (local path or fsspec URL) chosen by extension.

    Every problem (unknown extension, missing, unreadable or malformed file, zero rows) is a
    one-line BadInput naming `field` and the file.
    """
    path = str(path)
    suffix = Path(path.split("?", 1)[0]).suffix.lower()
    kind = _FORMATS.get(suffix)
    if kind is None:
        raise BadInput(f"{field}: {path} has unknown extension {suffix or '(none)'!r}; "
                       f"use one of {', '.join(sorted(_FORMATS))}")

    is_url = "://" in path
    try:
        if is_url:
            import fsspec

            fs, fs_path = fsspec.core.url_to_fs(path)
            if not fs.isfile(fs_path):
                raise BadInput(f"{field}: file not found: {path}")
            size = fs.size(fs_path)
        else:
            local = Path(path).expanduser()
            if local.is_dir():
                raise BadInput(f"{field}: {path} is a folder, not a data file")
            if not local.is_file():
                raise BadInput(f"{field}: file not found: {path}")
            size = local.stat().st_size
        if size == 0:
            raise BadInput(f"{field}: {path} is empty (0 bytes)")

        if is_url:
            with fs.open(fs_path, "rb") as fh:
                table = _read(fh, kind)
        else:
            table = _read(str(local), kind)
    except BadInput:
        raise
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BadInput(f"{field}: cannot read {path} as {kind}: {first}") from exc

    if table.num_rows == 0:
        raise BadInput(f"{field}: {path} has no rows")
    return table


def _read(source, kind: str) -> pa.Table:
    if kind == "Parquet":
        return pq.read_table(source)
    if kind == "JSONL":
        # The default 1 MiB block fails on any single line longer than that (long documents).
        return pa_json.read_json(source, read_options=pa_json.ReadOptions(block_size=32 << 20))
    # Quoted fields in text datasets often hold newlines; allow them.
    return pa_csv.read_csv(source, parse_options=pa_csv.ParseOptions(newlines_in_values=True))


def folder_sha256(path: str | Path) -> str:
    """One hash over a local folder's files (their relative paths and contents, hidden files
    left out): a dataset folder's identity, as a hub dataset's is its commit."""
    import hashlib

    import fsspec

    from stages.pipeline.store import sha256_file

    root, fs = Path(path).expanduser(), fsspec.filesystem("file")
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(root).parts)):
        digest.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(fs, str(f))}\n".encode())
    return digest.hexdigest()


def file_sha256(path: str, field: str = "source") -> str | None:
    """Content hash of a local or fsspec file (None when it does not exist); enters fingerprints.
    A folder or a file that cannot be read is a one-line BadInput naming `field` and the path."""
    import fsspec

    from stages.pipeline.store import sha256_file

    fs, fs_path = fsspec.core.url_to_fs(str(Path(path).expanduser()) if "://" not in str(path) else str(path))
    if fs.isdir(fs_path):
        raise BadInput(f"{field}: {path} is a folder, not a data file")
    if not fs.isfile(fs_path):
        return None
    try:
        return sha256_file(fs, fs_path)
    except OSError as e:
        raise BadInput(f"{field}: cannot read {path}: {e.strerror or e}") from None
