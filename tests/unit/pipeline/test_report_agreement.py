"""`align agreement EXP@k`: a round's pairs (chosen by its own annotator) re-scored by a yardstick
annotator: the fraction ordered the same way and the mean margin, checked against counts by hand."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import align
from stages.annotators import vader_compound
from stages.config import annotator_step
from stages.pipeline.report import pair_agreement
from stages.pipeline.store import ArtifactStore

GOOD, BAD, FLAT = "a wonderful, brilliant film", "an awful, dreadful mess", "a film"


def write_pool(root, experiment, pairs, round_=0):
    """A build_pool table of pairs (generation1 chosen) and the annotate manifest that labelled them."""
    store = ArtifactStore(str(root))
    for stage, columns, config in (
            ("annotate", {"prompt": ["p"]}, {"steps": [{"kind": "llm_judge"}]}),
            ("build_pool", {"prompt": ["The movie was"] * len(pairs), "generation1": [c for c, _ in pairs],
                            "generation2": [r for _, r in pairs]}, {"kind": "pairs"})):
        work = store.new_workdir()
        pq.write_table(pa.table(columns), work / "data.parquet")
        store.commit(work, store.stage_dir(experiment, round_, stage),
                     {"fingerprint": "f", "run_id": "r", "rows": len(columns["prompt"]), "config": config,
                      "metrics": {}})


def test_agreement_counts_the_pairs_the_yardstick_orders_the_same_way(tmp_path):
    # Three pairs the sentiment rule orders as the judge did, one reversed: agreement 3/4.
    pairs = [(GOOD, BAD), (GOOD, FLAT), (FLAT, BAD), (BAD, GOOD)]
    write_pool(tmp_path, "judge", pairs)
    out = pair_agreement(ArtifactStore(str(tmp_path)), "judge", 0, [annotator_step(kind="rule")])
    assert out["pairs"] == 4 and out["agreement"] == pytest.approx(0.75)
    assert out["labelled_by"] == "llm_judge" and out["yardstick"] == "rule"
    score = dict(zip([GOOD, BAD, FLAT], vader_compound(["The movie was"] * 3, [GOOD, BAD, FLAT])))
    assert score[GOOD] > score[FLAT] > score[BAD]
    assert out["margin"] == pytest.approx(sum(score[c] - score[r] for c, r in pairs) / 4)
    assert 0.0 <= out["agreement_ci_low"] <= 0.75 <= out["agreement_ci_high"] <= 1.0


def test_a_tie_counts_half(tmp_path):
    write_pool(tmp_path, "judge", [(FLAT, FLAT), (GOOD, BAD)])
    out = pair_agreement(ArtifactStore(str(tmp_path)), "judge", 0, [annotator_step(kind="rule")])
    assert out["agreement"] == pytest.approx(0.75)


def test_the_command_reads_its_yardstick_from_a_config_and_names_what_is_missing(tmp_path):
    write_pool(tmp_path, "judge", [(GOOD, BAD), (GOOD, FLAT)], round_=1)
    config = tmp_path / "run.yaml"
    config.write_text("experiment: x\nannotate: {steps: [{kind: rule}]}\n")
    done = align("agreement", "judge@1", "--config", config, "--artifacts", tmp_path, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["agreement"] == pytest.approx(1.0)
    done = align("agreement", "judge@1", "--artifacts", tmp_path)
    assert done.returncode == 2 and "judge@1 has no evaluate manifest" in done.stderr.strip().splitlines()[-1]
    done = align("agreement", "other", "--config", config, "--artifacts", tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"align: error: agreement: other@0 has no build_pool table under {tmp_path}")


def test_saved_agreement_names_the_pool_it_was_made_on_in_the_results_page(tmp_path):
    from flows.results_page import Run, agreement_evidence

    config = tmp_path / "run.yaml"
    config.write_text("experiment: x\nannotate: {steps: [{kind: rule}]}\n")
    for name in ("judge", "judge_seed1"):
        write_pool(tmp_path, name, [(GOOD, BAD), (BAD, GOOD)])
        done = align("agreement", name, "--config", config, "--artifacts", tmp_path, "--save", "--format", "json")
        assert done.returncode == 0, done.stderr
        saved = json.loads((tmp_path / name / "round-0" / "agreement.json").read_text())
        assert saved["agreement"] == json.loads(done.stdout)["agreement"] == pytest.approx(0.5)
        assert saved["provenance"]["commit"] and saved["finished"]
    write_pool(tmp_path, "judge_seed1", [(GOOD, FLAT)])  # its pool re-made: not the one the figure was made on
    line = agreement_evidence(ArtifactStore(str(tmp_path)), Run("m", "c.yaml", ("judge", "judge_seed1")))
    assert "seed 0, round 0: 0.500 [" in line and "of 2 pairs (its own pool" in line
    assert "seed 1, round 0: 0.500 [" in line and "(the pool re-made from its config and seed" in line
