"""rounds_table: a row per evaluated round, the paired gain as evaluate wrote it or, for artifacts
of evaluate before version 9 (round 0's interval only), round 0's reward minus the base's."""

import pytest

from stages.pipeline.report import COLUMNS, rounds_table, with_interval


class FakeStore:
    def __init__(self, metrics: dict[int, dict]):
        self.metrics = metrics

    def rounds(self, experiment):
        return sorted(self.metrics)

    def stage_dir(self, experiment, round_, stage):
        return (round_, stage)

    def read_manifest(self, path):
        round_, stage = path
        return {"metrics": self.metrics[round_]} if stage == "evaluate" else None


def test_the_gain_is_evaluates_and_older_artifacts_derive_round_0s():
    old = FakeStore({0: {"mean_reward": 0.6, "base_mean_reward": 0.55, "reward_gain_ci_low": 0.01,
                         "reward_gain_ci_high": 0.09}, 1: {"mean_reward": 0.7}})
    rows = rounds_table(old, "x")
    assert rows[0]["reward_gain"] == pytest.approx(0.05) and "reward_gain" not in rows[1]
    assert with_interval(rows[0], "reward_gain") == "0.050 [0.010, 0.090]"
    assert with_interval(rows[1], "reward_gain") == "-"
    new = FakeStore({0: {"mean_reward": 0.6, "base_mean_reward": 0.55, "reward_gain": 0.04, "reward_gain_ci_low": 0.0,
                         "reward_gain_ci_high": 0.08}})
    assert rounds_table(new, "x")[0]["reward_gain"] == 0.04  # evaluate's own mean of the differences stands
    assert [m for m, _ in COLUMNS][:3] == ["mean_reward", "reward_gain", "kl_to_reference"]
