"""The reported numbers are the runs of record's: the manifests in docs/results, read as `align
report --artifacts docs/results` reads them, give the rows of the results page and README's
headline table (a re-run that updates a page without `make results`, or the reverse, fails here)."""

import pytest

from conftest import ROOT
from stages.pipeline.report import across_seeds, base_row, rounds_table, with_interval, with_spread
from stages.pipeline.store import ArtifactStore

RESULTS = (ROOT / "docs" / "results.md").read_text()
README = (ROOT / "README.md").read_text()


def cells(prefix: str, text: str = RESULTS) -> list[list[str]]:
    return [[c.strip().replace("**", "") for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(prefix)]


@pytest.mark.parametrize("experiment, method",
                         [("online_dpo_movies", "online DPO"), ("quark_movies", "Quark"), ("nlf_movies", "NLF")])
def test_seed_rows_and_seeds_table_are_the_manifests(experiment, method):
    store = ArtifactStore(str(ROOT / "docs/results"))
    seed0 = rounds_table(store, experiment)
    rows = cells(f"| `{experiment}`")  # its first row names the day: "`quark_movies` (2026-12-03)"
    assert rows[0][1] == "base, plain" and rows[0][2] == with_interval(base_row(seed0), "base_mean_reward")
    assert [(r[2], r[3]) for r in rows[1:]] == [(with_interval(m, "mean_reward"), with_interval(m, "kl_to_reference"))
                                                for m in seed0]
    seeds = across_seeds([rounds_table(store, e) for e in (experiment, f"{experiment}_seed1", f"{experiment}_seed2")])
    table = cells(f"| {method} |")
    assert len(table) == len(seeds) == 3
    assert [(r[2], r[3]) for r in table] == [(with_spread(s, "mean_reward"), with_spread(s, "gain")) for s in seeds]
    # README's headline row: round 2's gain over the base and KL, over the seeds.
    (headline,) = cells(f"| {method} (3 seeds) |", README)
    assert headline[1:] == [with_spread(seeds[2], "gain"), with_spread(seeds[2], "kl_to_reference")]
