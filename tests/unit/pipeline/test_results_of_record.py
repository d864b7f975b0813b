"""The reported numbers are the runs of record's: docs/results.md is what the generator makes of
the manifests in docs/results (as `align report --artifacts docs/results --format md` reads them),
and README's headline rows are those manifests' numbers (a re-run that updates a page without
`make results`, or the reverse, fails here)."""

import pytest

from conftest import ROOT
from flows import results_page
from stages.pipeline.report import across_seeds, base_row, rounds_table, with_interval, with_spread
from stages.pipeline.store import ArtifactStore

README = (ROOT / "README.md").read_text()
STORE = ArtifactStore(str(ROOT / "docs/results"))


def cells(prefix: str, text: str) -> list[list[str]]:
    return [[c.strip().replace("**", "") for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(prefix)]


def test_the_results_page_is_generated_from_the_runs_of_record():
    assert (ROOT / "docs" / "results.md").read_text() == results_page.page(), "docs/results.md is stale: run `align docs`"


@pytest.mark.parametrize("method, _config, names", results_page.RUNS)
def test_the_page_rows_and_readme_headline_are_the_manifests(method, _config, names):
    text = results_page.page()
    runs = [rounds_table(STORE, n) for n in names]
    for name, rows in zip(names, runs):
        page_rows = cells(f"| `{name}` |", text)
        assert page_rows[0][1:3] == ["base", with_interval(base_row(rows), "base_mean_reward")]
        assert [(r[2], r[4]) for r in page_rows[1:]] == [(with_interval(m, "mean_reward"), with_interval(m, "kl_to_reference"))
                                                         for m in rows]
    seeds = across_seeds(runs)
    assert len(seeds) == 3
    label = {"Online DPO": "online DPO"}.get(method, method)
    (headline,) = cells(f"| {label} (3 seeds) |", README)  # round 2's gain over the base and KL, over the seeds
    assert headline[1:] == [with_spread(seeds[2], "gain"), with_spread(seeds[2], "kl_to_reference")]
