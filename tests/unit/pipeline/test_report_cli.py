"""`align report` on the runs of record: an 80-column terminal gets a layout that fits it (no line
wider, nothing cut to an ellipsis), --wide the full table, --format md/csv/json a file's worth."""

import csv
import io
import json

from conftest import ROOT, align

RUNS = ["online_dpo_movies+online_dpo_movies_seed1+online_dpo_movies_seed2", "quark_movies"]


def base_cells() -> tuple[str, str]:
    """quark_movies' base reward and its interval as the report prints them, from its manifest (the
    runs of record are re-made now and then: the test reads what they hold)."""
    m = json.loads((ROOT / "docs/results/quark_movies/round-0/evaluate/manifest.json").read_text())["metrics"]
    interval = f"[{m['base_mean_reward_ci_low']:.3f}, {m['base_mean_reward_ci_high']:.3f}]"
    return interval, f"{m['base_mean_reward']:.3f} {interval}"


def report(*args, columns=80):
    out = align("report", "--artifacts", ROOT / "docs/results", *RUNS, *args, env={"COLUMNS": str(columns)})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_an_80_column_terminal_gets_a_report_that_fits(tmp_path):
    text = report("--out", tmp_path / "x.png")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    assert "--wide for every column" in text and base_cells()[0] in text  # seed 0's base, interval whole
    wide = report("--out", tmp_path / "x.png", "--wide", columns=250)
    assert "distinct-2" in wide and "perplexity" not in text and "distinct-2" not in text


def test_formats_for_files():
    md = report("--format", "md")
    assert md.startswith("| experiment | round | reward |") and f"| `quark_movies` | base | {base_cells()[1]} |" in md
    assert "across 3 seeds" in md
    rows = list(csv.DictReader(io.StringIO(report("--format", "csv"))))
    assert {r["experiment"] for r in rows} == {"online_dpo_movies", "online_dpo_movies_seed1", "online_dpo_movies_seed2",
                                               "quark_movies"}
    data = json.loads(report("--format", "json"))
    assert data[0]["round"] == "base" and data[1]["mean_reward_ci_low"] < data[1]["mean_reward"]
