"""stages.services.sample_metrics against values worked out by hand."""

import math

import pytest

from stages.services import sample_metrics as M


def test_distinct_n_counts_unique_ngrams_over_all():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert M.distinct_n(seqs, 1) == pytest.approx(4 / 6)
    assert M.distinct_n(seqs, 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)
    assert M.distinct_n(seqs, 3) == pytest.approx(2 / 2)
    assert M.distinct_n([[1]], 2) is None


def test_perplexity_is_per_token_over_all_samples():
    assert M.perplexity([-2.0, -4.0], [2, 2]) == pytest.approx(math.exp(6 / 4))
    assert M.perplexity([], []) is None


def test_bootstrap_interval_of_a_mean():
    assert M.bootstrap_ci([0.3] * 20, seed=0) == pytest.approx((0.3, 0.3))
    lo, hi = M.bootstrap_ci([0.0, 1.0] * 50, seed=0)
    half = 1.96 * math.sqrt(0.25 / 100)  # the normal approximation: +-0.098
    assert lo == pytest.approx(0.5 - half, abs=0.02) and hi == pytest.approx(0.5 + half, abs=0.02)
    assert M.bootstrap_ci([1.0, None, float("nan")], seed=0) is None  # one usable value
    assert M.bootstrap_ci([0.0, 1.0] * 50, seed=0) == M.bootstrap_ci([0.0, 1.0] * 50, seed=0)


def test_paired_interval_uses_prompts_both_scored():
    a, b = [1.0, 2.0, None, 4.0], [0.5, 1.5, 9.0, 3.5]
    assert M.paired_differences(a, b) == [0.5, 0.5, 0.5]
    assert M.bootstrap_ci(M.paired_differences(a, b), seed=0) == pytest.approx((0.5, 0.5))


def test_reward_quantiles():
    q = M.quantiles([float(x) for x in range(11)])
    assert q == {"p10": 1.0, "p25": 2.5, "p50": 5.0, "p75": 7.5, "p90": 9.0}


def test_spearman_with_ties():
    assert M.spearman([0, 1, 2, 3], [1.0, 2.0, 3.0, 9.0]) == pytest.approx(1.0)
    assert M.spearman([0, 1, 2, 3], [9.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    # ranks of y with a tie: [1, 2.5, 2.5, 4] -> Pearson with [1, 2, 3, 4]
    assert M.spearman([0, 1, 2, 3], [1.0, 2.0, 2.0, 5.0]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    assert M.spearman([0, 1], [1.0, 1.0]) is None


def test_per_prompt_means_of_consecutive_samples():
    assert M.per_prompt_means([1.0, 3.0, None, 4.0, None, float("nan")], 2) == [2.0, 4.0, None]
    assert M.per_prompt_means([0.5, 0.25], 1) == [0.5, 0.25]
