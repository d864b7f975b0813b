"""stages.data: reading user tables, corpus look-up, the VADER reward, preparing the corpora."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.data import sources as data
from stages.data import tables
from stages.pipeline.errors import BadInput
from stages.pipeline.paths import cache_dir

# --------------------------------------------------------------------------- read_table_file


@pytest.fixture
def table():
    return pa.table({"prompt": ["a", "b"], "score": [1.5, -2.0]})


def test_reads_parquet(tmp_path, table):
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    assert tables.read_table_file(str(path)).equals(table)


def test_reads_jsonl_and_json_lines(tmp_path, table):
    body = '{"prompt": "a", "score": 1.5}\n{"prompt": "b", "score": -2.0}\n'
    for name in ("t.jsonl", "t.json"):
        (tmp_path / name).write_text(body)
        assert tables.read_table_file(str(tmp_path / name)).equals(table)


def test_reads_csv_with_newline_in_quoted_value(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('prompt,score\n"line one\nline two",1.5\nb,-2\n')
    got = tables.read_table_file(str(path))
    assert got.column("prompt").to_pylist() == ["line one\nline two", "b"]
    assert got.column("score").to_pylist() == [1.5, -2.0]


def test_reads_fsspec_url(table):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    with fs.open("/align-test/t.parquet", "wb") as fh:
        pq.write_table(table, fh)
    try:
        assert tables.read_table_file("memory://align-test/t.parquet").equals(table)
        with pytest.raises(BadInput, match="memory://align-test/nope.csv"):
            tables.read_table_file("memory://align-test/nope.csv")
    finally:
        fs.rm("/align-test", recursive=True)


def _bad(path, field="train.source") -> str:
    with pytest.raises(BadInput) as err:
        tables.read_table_file(str(path), field=field)
    msg = str(err.value)
    assert str(path) in msg and field in msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    assert "not found" in _bad(tmp_path / "absent.parquet")


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "d.csv").mkdir()
    assert "is a folder, not a data file" in _bad(tmp_path / "d.csv")


def test_bad_extension(tmp_path):
    path = tmp_path / "t.xlsx"
    path.write_text("x")
    assert "extension" in _bad(path)


def test_malformed_jsonl(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    assert "JSONL" in _bad(path)


def test_json_array_is_not_json_lines(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"prompt": "a"}, {"prompt": "b"}]')
    _bad(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"this is not parquet at all")
    assert "Parquet" in _bad(path)


@pytest.mark.parametrize("name", ["t.csv", "t.jsonl", "t.parquet"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    assert "empty" in _bad(path)


def test_zero_rows(tmp_path, table):
    (tmp_path / "h.csv").write_text("prompt,score\n")
    assert "no rows" in _bad(tmp_path / "h.csv")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert "no rows" in _bad(tmp_path / "blank.jsonl")
    pq.write_table(table.slice(0, 0), tmp_path / "z.parquet")
    assert "no rows" in _bad(tmp_path / "z.parquet")


# --------------------------------------------------------------------------- corpora


def test_unknown_corpus_lists_known_names():
    with pytest.raises(BadInput) as err:
        data.read_corpus("imdb")
    for name in data.CORPORA:
        assert name in str(err.value)


def test_unprepared_corpus_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    with pytest.raises(BadInput, match="align data prepare"):
        data.read_corpus("tweets")
    with pytest.raises(BadInput, match="align data prepare"):
        data.corpus_path("movie_snippets")


# --------------------------------------------------------------------------- VADER reward


def test_vader_sentiment_signs():
    pos, neg, neutral = data.vader_sentiment(
        ["I love this movie, it is wonderful and great!",
         "This is a horrible, awful, terrible disaster.",
         "The box is on the table."]
    )
    assert 0 < pos <= 1 and -1 <= neg < 0 and neutral == 0.0
    assert data.vader_sentiment([]) == []
    with pytest.raises(TypeError):
        data.vader_sentiment("a string, not a list")


# --------------------------------------------------------------------------- prepare_data (offline, fake sdist)


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@pytest.fixture
def fake_sdist(tmp_path, monkeypatch):
    """A tiny sdist shaped like the real one: CRLF lines, UTF-8, a BOM, no final line ending."""
    bodies = {
        "movieReviewSnippets_GroundTruth.txt": "1\t2.5\tThe clich\u00e9s disappear. \r\n2\t-3.875\tBad.",
        "tweets_GroundTruth.txt": "1\t0.4\twin \u00a31000\r\n",
        "amazonReviewSnippets_GroundTruth.txt": "\ufeff1_1\t-0.9\tno picture\r\n1_2\t0\tok\r\n",
        "nytEditorialSnippets_GroundTruth.txt": "1_1\t0.4\tOn Dec. 19, around noon\r\n",
    }
    inner = _tar_bytes({f"hutto_ICWSM_2014/{k}": v.encode("utf-8") for k, v in bodies.items()})
    sdist = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    sdist.write_bytes(_tar_bytes({f"vaderSentiment-3.3.2/{data.INNER_ARCHIVE}": inner}))
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ALIGN_VADER_SDIST", str(sdist))
    monkeypatch.setattr(data, "_EXPECTED_ROWS", {"movie_snippets": 2, "tweets": 1,
                                                 "product_snippets": 2, "editorial_snippets": 1})
    return sdist


def test_prepare_from_local_sdist_is_idempotent(fake_sdist, tmp_path, monkeypatch):
    out = data.prepare_data()
    assert out == tmp_path / "cache" / "data" / "vader"
    movies = data.read_corpus("movie_snippets")
    assert movies.schema == pa.schema([("id", pa.string()), ("valence", pa.float64()), ("text", pa.string())])
    assert movies.to_pylist() == [
        {"id": "1", "valence": 2.5, "text": "The clich\u00e9s disappear."},
        {"id": "2", "valence": -3.875, "text": "Bad."},
    ]
    assert data.read_corpus("product_snippets").column("id").to_pylist() == ["1_1", "1_2"]
    assert not [p for p in out.parent.iterdir() if p.name != "vader"]  # no temp folders left

    # Complete: a second call neither reads the sdist nor rewrites anything.
    monkeypatch.setenv("ALIGN_VADER_SDIST", str(tmp_path / "gone.tar.gz"))
    mtime = (out / "tweets.parquet").stat().st_mtime_ns
    assert data.prepare_data() == out
    assert (out / "tweets.parquet").stat().st_mtime_ns == mtime
    # force=True does read it again (and here finds it missing).
    with pytest.raises(BadInput, match="ALIGN_VADER_SDIST"):
        data.prepare_data(force=True)
    assert data.read_corpus("tweets").num_rows == 1  # the old, complete folder is untouched


def test_prepare_rebuilds_incomplete_folder(fake_sdist):
    out = data.prepare_data()
    (out / "tweets.parquet").unlink()
    with pytest.raises(BadInput, match="align data prepare"):
        data.read_corpus("tweets")
    assert data.prepare_data() == out
    assert data.read_corpus("tweets").column("text").to_pylist() == ["win \u00a31000"]


def test_prepare_checks_row_counts(fake_sdist, monkeypatch):
    monkeypatch.setattr(data, "_EXPECTED_ROWS", {**data._EXPECTED_ROWS, "tweets": 4200})
    with pytest.raises(RuntimeError, match="tweets"):
        data.prepare_data()
    assert not (Path(data.cache_dir()) / "data" / "vader").exists()


def test_prepare_rejects_archive_without_corpora(tmp_path, monkeypatch):
    sdist = tmp_path / "other.tar.gz"
    sdist.write_bytes(_tar_bytes({"pkg/README": b"hi"}))
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ALIGN_VADER_SDIST", str(sdist))
    with pytest.raises(BadInput, match="hutto_ICWSM_2014"):
        data.prepare_data()


# --------------------------------------------------------------------------- the real prepared cache


def test_prepared_cache_movie_snippets():
    if not (cache_dir() / "data" / "vader" / "movie_snippets.parquet").is_file():
        pytest.skip(f"VADER corpora not prepared under {cache_dir()} (run `align data prepare`)")
    movies = data.read_corpus("movie_snippets")
    # 10,605 per the archive's README (`wc -l` says 10,604: the last line has no line ending).
    assert movies.num_rows == 10_605
    valence = movies.column("valence").to_pylist()
    assert all(-4.0 <= v <= 4.0 for v in valence)
    assert all(t and t == t.strip() and "\r" not in t for t in movies.column("text").to_pylist())
    assert len(set(movies.column("id").to_pylist())) == movies.num_rows
