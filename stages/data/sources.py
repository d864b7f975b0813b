"""The VADER ground-truth corpora (the prompts of the movie task) and the VADER sentiment reward.

The corpora come from the vaderSentiment 3.3.2 *source* archive (the wheel lacks them):
`additional_resources/hutto_ICWSM_2014.tar.gz` holds four `*_GroundTruth.txt` files, each
line `id<TAB>mean valence in [-4, 4]<TAB>text` with CRLF endings, UTF-8. PyPI is the only
network we can count on, so `pip download` of the sdist is how the data arrives;
`ALIGN_VADER_SDIST` points at an already-downloaded sdist for machines with no network.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.pipeline.atomic import build_lock, recover, swap_in
from stages.pipeline.errors import BadInput
from stages.pipeline.paths import cache_dir

VADER_REQUIREMENT = "vadersentiment==3.3.2"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"

# Our corpus name -> file name inside the inner archive (found under `hutto_ICWSM_2014/`).
_SOURCE_FILES = {
    "movie_snippets": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "product_snippets": "amazonReviewSnippets_GroundTruth.txt",
    "editorial_snippets": "nytEditorialSnippets_GroundTruth.txt",
}
CORPORA = tuple(_SOURCE_FILES)

# Row counts as stated in the archive's _README_.txt and found in the files. (`wc -l` gives one
# less for each, because the last line has no line ending.) A mismatch means a different archive.
_EXPECTED_ROWS = {
    "movie_snippets": 10_605,
    "tweets": 4_200,
    "product_snippets": 3_708,
    "editorial_snippets": 5_190,
}

_SCHEMA = pa.schema([("id", pa.string()), ("valence", pa.float64()), ("text", pa.string())])
# Written last, inside the temp folder, so its presence after the rename means "complete".
_MARKER = "_COMPLETE.json"


def _vader_dir() -> Path:
    return cache_dir() / "data" / "vader"


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and all(
        (folder / f"{name}.parquet").is_file() for name in CORPORA
    )


# --------------------------------------------------------------------------- preparing corpora


def prepare_data(force: bool = False) -> Path:
    """Build cache_dir()/data/vader/<corpus>.parquet once; return that folder.

    Idempotent: a complete folder is returned as it is unless `force`. The files are written
    into a temp folder beside the target and renamed into place, so a crash never leaves a
    folder that looks complete.
    """
    dest = _vader_dir()
    with build_lock(dest):  # a second process waits, then finds the corpora prepared
        recover(dest)
        if not force and _is_complete(dest):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        _prepare_into(dest)
    return dest


def _prepare_into(dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="vader-sdist-") as download_dir:
        sdist_env = os.environ.get("ALIGN_VADER_SDIST")
        if sdist_env:
            sdist = Path(sdist_env).expanduser()
            if not sdist.is_file():
                raise BadInput(f"ALIGN_VADER_SDIST: no such file {sdist}")
        else:
            sdist = _download_sdist(Path(download_dir))
        tables = _read_corpora(sdist)

    # Same parent as dest, hence same filesystem, so the rename below is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=".vader.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared with other users
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        rows = {name: table.num_rows for name, table in tables.items()}
        (tmp / _MARKER).write_text(
            json.dumps({"source": f"{VADER_REQUIREMENT} sdist: {INNER_ARCHIVE}", "rows": rows}, indent=2)
        )
        swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once the rename has happened


def _download_sdist(into: Path) -> Path:
    """`pip download` the source archive (not the wheel: only the sdist has the corpora)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           VADER_REQUIREMENT, "-d", str(into)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"pip download of the {VADER_REQUIREMENT} sdist failed: {exc}; "
                           "set ALIGN_VADER_SDIST to a downloaded vaderSentiment-3.3.2.tar.gz") from exc
    found = sorted(into.glob("*.tar.gz"))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit code {proc.returncode}, no archive saved"
        raise RuntimeError(f"pip download of the {VADER_REQUIREMENT} sdist failed: {why}; "
                           "set ALIGN_VADER_SDIST to a downloaded vaderSentiment-3.3.2.tar.gz")
    return found[0]


def _read_corpora(sdist: Path) -> dict[str, pa.Table]:
    """Open sdist -> inner hutto tar.gz (in memory, ~2 MB) -> parse the four ground-truth files."""
    try:
        with tarfile.open(sdist, "r:*") as outer:
            # The sdist's top folder is `vaderSentiment-3.3.2/`; match on the path below it.
            member = next((m for m in outer.getmembers() if m.name.endswith("/" + INNER_ARCHIVE)), None)
            if member is None:
                raise BadInput(f"sdist {sdist}: no {INNER_ARCHIVE} inside")
            inner_bytes = outer.extractfile(member).read()
        # Read members by name only (never extractall), so odd paths in the archive are harmless.
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            by_base = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
            raw = {}
            for name, base in _SOURCE_FILES.items():
                if base not in by_base:
                    raise BadInput(f"sdist {sdist}: {INNER_ARCHIVE} has no {base}")
                raw[name] = inner.extractfile(by_base[base]).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadInput(f"sdist {sdist}: not a readable vaderSentiment source archive ({exc})") from exc

    tables = {name: _parse_ground_truth(data, _SOURCE_FILES[name]) for name, data in raw.items()}
    wrong = {n: t.num_rows for n, t in tables.items() if t.num_rows != _EXPECTED_ROWS[n]}
    if wrong:
        raise RuntimeError(f"sdist {sdist}: unexpected row counts {wrong}, expected "
                           f"{ {n: _EXPECTED_ROWS[n] for n in wrong} }")
    return tables


def _parse_ground_truth(data: bytes, source: str) -> pa.Table:
    # All four files are valid UTF-8 (a few movie lines hold é/í, two tweets £/ñ); decode
    # strictly so a changed archive fails loudly instead of storing mangled text.
    # utf-8-sig drops a byte-order mark if one is there.
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RuntimeError(f"{source}: not UTF-8 at byte {exc.start}") from exc
    ids, valences, texts = [], [], []
    # Split on "\n" only: str.splitlines() would also break on \x0b, \x85, U+2028, ...
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            valence = float(parts[1]) if len(parts) == 3 else None
        except ValueError:
            valence = None
        if valence is None:
            raise RuntimeError(f"{source} line {lineno}: expected id<TAB>valence<TAB>text")
        if not -4.0 <= valence <= 4.0:
            raise RuntimeError(f"{source} line {lineno}: valence {valence} outside [-4, 4]")
        ids.append(parts[0].strip())
        valences.append(valence)
        texts.append(parts[2].strip())
    return pa.table([ids, valences, texts], schema=_SCHEMA)


# --------------------------------------------------------------------------- reading corpora


def corpus_path(name: str) -> Path:
    """Path of a prepared corpus' Parquet file; BadInput if the name is unknown or not prepared."""
    if name not in _SOURCE_FILES:
        raise BadInput(f"corpus: unknown name {name!r}; known: {', '.join(CORPORA)}")
    path = _vader_dir() / f"{name}.parquet"
    if not path.is_file():
        raise BadInput(f"corpus {name!r}: {path} is missing; run `align data prepare`")
    return path


def read_corpus(name: str) -> pa.Table:
    """Columns: id (string), valence (float64 in [-4, 4]), text (string)."""
    return pq.read_table(corpus_path(name))


# --------------------------------------------------------------------------- VADER reward


@functools.lru_cache(maxsize=1)
def _analyzer():
    # Imported here so modules that only read data don't pay for it; the lexicon loads once.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(texts: list[str]) -> list[float]:
    """VADER compound score per text, in [-1, 1]: an instant rule-based sentiment reward."""
    if isinstance(texts, str):  # a bare string would be scored character by character
        raise TypeError("vader_sentiment takes a list of strings, not a string")
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]
