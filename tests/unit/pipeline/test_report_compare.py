"""`align compare A@k B@j`: two rounds' held-out reward and KL paired prompt by prompt, A minus B
with a bootstrap interval; checked against the difference computed by hand."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import align
from stages.pipeline.report import compare_rounds
from stages.pipeline.store import ArtifactStore


def write_evaluate(root, experiment, round_, scores, kls, base=None):
    """An evaluate table: two samples per prompt p0, p1, ... (scores[i] is prompt i//2's sample i%2)."""
    store = ArtifactStore(str(root))
    work = store.new_workdir()
    n = len(scores)
    columns = {"prompt_id": [f"p{i // 2}" for i in range(n)], "sample_index": [i % 2 for i in range(n)],
               "score": scores, "kl": kls, "base_score": base or [0.5] * n}
    pq.write_table(pa.table(columns), work / "data.parquet")
    store.commit(work, store.stage_dir(experiment, round_, "evaluate"),
                 {"fingerprint": "f", "run_id": "r", "rows": n, "metrics": {}})


def test_the_difference_is_paired_prompt_by_prompt(tmp_path):
    # Prompt means: A 0.8, 0.2, 0.6 ; B 0.6, 0.1, 0.5 -> differences 0.2, 0.1, 0.1 (mean 0.1333).
    write_evaluate(tmp_path, "a", 2, [0.7, 0.9, 0.2, 0.2, 0.5, 0.7], [1, 3, 2, 2, 4, 4])
    write_evaluate(tmp_path, "b", 1, [0.6, 0.6, 0.0, 0.2, 0.5, 0.5], [1, 1, 1, 1, 1, 1])
    out = compare_rounds(ArtifactStore(str(tmp_path)), ("a", 2), ("b", 1))
    assert out["prompts"] == 3 and out["same_base"] is True
    assert out["reward_difference"] == pytest.approx((0.2 + 0.1 + 0.1) / 3)
    assert out["reward_a"] == pytest.approx(1.6 / 3) and out["reward_b"] == pytest.approx(1.2 / 3)
    assert out["kl_difference"] == pytest.approx((1 + 1 + 3) / 3)
    # Every resample's mean lies between the smallest and largest per-prompt difference.
    assert 0.1 - 1e-9 <= out["reward_difference_ci_low"] <= out["reward_difference"] <= out["reward_difference_ci_high"] <= 0.2 + 1e-9


def test_only_prompts_both_scored_are_paired_and_a_different_base_is_said(tmp_path):
    write_evaluate(tmp_path, "a", 0, [1.0, 1.0, 0.0, 0.0], [0, 0, 0, 0])
    write_evaluate(tmp_path, "b", 0, [0.5, 0.5, 0.0, 0.0, 9.0, 9.0], [0] * 6, base=[0.1] * 6)  # p2: B only
    out = compare_rounds(ArtifactStore(str(tmp_path)), ("a", 0), ("b", 0))
    assert out["prompts"] == 2 and out["reward_difference"] == pytest.approx(0.25) and out["same_base"] is False


def test_the_command_names_what_is_missing_in_one_line(tmp_path):
    write_evaluate(tmp_path, "a", 0, [1.0, 1.0], [0.0, 0.0])
    write_evaluate(tmp_path, "b", 0, [0.0, 1.0], [0.0, 0.0])
    done = align("compare", "a", "b@0", "--artifacts", tmp_path, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reward_difference"] == pytest.approx(0.5)
    done = align("compare", "a@3", "b", "--artifacts", tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"align: error: compare: a has no evaluate table in round 3 under {tmp_path}")
