"""build_pool's record builders on hand-built rows."""

import pytest

from stages.build_pool import sft_records
from stages.config import BuildPoolConfig
from stages.pipeline.errors import BadInput


def row(pid, completion, score, split="train"):
    return {"prompt_id": pid, "prompt": f"opening {pid}", "completion": completion, "score": score, "split": split}


ROWS = [row("a", " fine", 0.2), row("a", " great", 0.9), row("a", " bad", -0.5),
        row("b", " dull", 0.1, "heldout"), row("b", " lovely", 0.7, "heldout")]


def test_sft_trains_on_every_completion_by_default():
    assert [r["generation1"] for r in sft_records(ROWS, BuildPoolConfig(kind="sft"), seed=0)] == [
        " fine", " great", " bad", " dull", " lovely"]


def test_sft_best_keeps_each_prompts_best_scored_completion():
    out = sft_records(ROWS, BuildPoolConfig(kind="sft", sft_selection="best"), seed=0)
    assert [(r["prompt_id"], r["generation1"], r["split"]) for r in out] == [
        ("a", " great", "train"), ("b", " lovely", "heldout")]


def test_sft_best_breaks_ties_by_the_seed_and_needs_scores():
    tied = [row("a", " one", 0.5), row("a", " two", 0.5)]
    picks = {sft_records(tied, BuildPoolConfig(kind="sft", sft_selection="best"), seed=s)[0]["generation1"]
             for s in range(20)}
    assert picks == {" one", " two"}
    with pytest.raises(BadInput, match="needs a 'score'"):
        sft_records([{**r, "score": None} for r in tied], BuildPoolConfig(kind="sft", sft_selection="best"), seed=0)
