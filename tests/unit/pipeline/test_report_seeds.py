"""The across-seeds summary of `align report A+B+C`, against values worked out by hand."""

import math

import pytest

from stages.pipeline.report import across_seeds, seeds_series, with_spread


def run(base, rounds):
    rows = [{"round": k, "mean_reward": r, "kl_to_reference": kl, "perplexity": 7.0, "distinct_2": 0.5}
            for k, (r, kl) in enumerate(rounds)]
    rows[0]["base_mean_reward"] = base
    return rows


def test_mean_sd_and_range_over_seeds_by_hand():
    runs = [run(0.5, [(0.6, 4.0), (0.7, 8.0)]), run(0.6, [(0.8, 6.0), (0.9, 10.0)]), run(0.4, [(0.7, 5.0)])]
    rows = across_seeds(runs)
    assert [r["round"] for r in rows] == [0]  # round 1 is missing from the third seed
    r = rows[0]
    assert r["seeds"] == 3
    # rewards 0.6, 0.8, 0.7: mean 0.7, squared deviations 0.01 + 0.01 + 0 over n - 1 = 2 -> sd 0.1
    assert r["mean_reward"] == pytest.approx(0.7) and r["mean_reward_sd"] == pytest.approx(0.1)
    assert (r["mean_reward_min"], r["mean_reward_max"]) == (0.6, 0.8)
    # gains over each seed's own base: 0.1, 0.2, 0.3 -> mean 0.2, sd 0.1
    assert r["gain"] == pytest.approx(0.2) and r["gain_sd"] == pytest.approx(0.1)
    # KL 4, 6, 5: mean 5, sd 1
    assert r["kl_to_reference"] == pytest.approx(5.0) and r["kl_to_reference_sd"] == pytest.approx(1.0)
    assert r["perplexity_sd"] == 0.0
    # controllability is missing from every run: reported as missing, not as zero
    assert r["controllability"] is None and with_spread(r, "controllability") == "-"
    assert with_spread(r, "kl_to_reference") == "5.000 ± 1.000 [4.000, 6.000]"


def test_one_seed_has_no_spread_and_series_draws_the_mean_with_the_range():
    assert across_seeds([]) == []
    (one,) = across_seeds([run(0.5, [(0.6, 4.0)])])
    assert one["mean_reward_sd"] is None and with_spread(one, "mean_reward") == "0.600 [0.600, 0.600]"
    drawn = seeds_series([run(0.5, [(0.6, 4.0), (0.7, 8.0)]), run(0.6, [(0.8, 6.0), (0.9, 10.0)])])
    assert [d["round"] for d in drawn] == [0, 1]
    assert drawn[1]["mean_reward"] == pytest.approx(0.8) and drawn[1]["kl_to_reference"] == pytest.approx(9.0)
    assert (drawn[1]["mean_reward_ci_low"], drawn[1]["mean_reward_ci_high"]) == (0.7, 0.9)
    assert math.isclose(drawn[0]["base_mean_reward"], 0.55)
    assert (drawn[0]["base_mean_reward_ci_low"], drawn[0]["base_mean_reward_ci_high"]) == (0.5, 0.6)
