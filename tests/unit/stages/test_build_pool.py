"""build_pool's record builders on hand-built rows."""

import pytest

from stages.build_pool import nlf, quark, sft_records
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


def test_quark_bins_spread_fewer_samples_than_bins_from_best_to_worst():
    # 4 samples of a prompt in 5 bins: the best gets <|quark_0|> and the worst <|quark_4|>, so the
    # control evaluate samples with last is trained too (it was never, under floor(i * q / n)).
    rows = [row("a", f" c{i}", s) for i, s in enumerate([0.1, 0.9, 0.5, 0.3])]
    cfg = BuildPoolConfig(kind="quark", quantiles=5, quantile_scope="per_prompt")
    got = {r["generation1"]: r["control"] for r in quark(rows, cfg, seed=0)}
    assert got == {" c1": "<|quark_0|>", " c2": "<|quark_1|>", " c3": "<|quark_3|>", " c0": "<|quark_4|>"}


def test_quark_bins_are_equal_size_per_scope_and_ties_share_a_bin():
    rows = [row(p, f" {p}{i}", float(i)) for p in "ab" for i in range(10)]
    cfg = BuildPoolConfig(kind="quark", quantiles=5, quantile_scope="per_prompt")
    got = {r["generation1"]: int(r["control"][8]) for r in quark(rows, cfg, seed=0)}
    assert [got[f" a{i}"] for i in range(10)] == [4, 4, 3, 3, 2, 2, 1, 1, 0, 0]
    assert [got[f" b{i}"] for i in range(10)] == [got[f" a{i}"] for i in range(10)]
    glob = {r["generation1"]: int(r["control"][8]) for r in quark(rows, BuildPoolConfig(kind="quark", quantiles=5), seed=0)}
    assert sorted(glob.values()) == sorted([k for k in range(5) for _ in range(4)])
    assert glob[" a9"] == glob[" b9"] == 0  # tied rewards, one bin
    nlf_cfg = BuildPoolConfig(kind="nlf", quantiles=4, feedback_phrases=["A", "B", "C", "D"], quantile_scope="per_prompt")
    assert [r["feedback"] for r in nlf(rows[:3], nlf_cfg, seed=0)] == ["D", "B", "A"]


def test_each_conditioned_record_is_partnered_with_its_prompts_farthest_sample_under_another_condition():
    rows = [row("a", f" a{i}", s) for i, s in enumerate([0.1, 0.9, 0.6, 0.3])] + [row("b", " b0", 0.7)]
    cfg = BuildPoolConfig(kind="quark", quantiles=4, quantile_scope="per_prompt")
    got = {r["generation1"]: r for r in quark(rows, cfg, seed=0)}
    # a1 (0.9) is farthest from a0 (0.1) and back; a2 (0.6) from a0, a3 (0.3) from a1.
    assert {k: got[k]["generation2"] for k in (" a0", " a1", " a2", " a3")} == {" a0": " a1", " a1": " a0", " a2": " a0", " a3": " a1"}
    assert got[" a2"]["control2"] == got[" a0"]["control"] == "<|quark_3|>" and got[" a2"]["generation2_reward"] == 0.1
    assert "generation2" not in got[" b0"]  # alone in its prompt: no partner
    # Tied rewards share a bin, so their condition: no partners at all.
    assert not any("generation2" in r for r in quark([row("c", f" c{i}", 0.5) for i in range(3)], cfg, seed=0))
    nlf_cfg = BuildPoolConfig(kind="nlf", quantiles=2, feedback_phrases=["Good.", "Bad."], quantile_scope="per_prompt")
    by_text = {r["generation1"]: r for r in nlf(rows[:4], nlf_cfg, seed=0)}
    assert by_text[" a1"]["feedback"] == "Good." and by_text[" a1"]["feedback2"] == "Bad." and by_text[" a1"]["generation2"] == " a0"
    assert by_text[" a2"]["generation2"] == " a0"  # a1 shares its phrase; of the other phrase's, a0 is farthest
    # partner_min_gap 0.6: a2 (0.6) loses its partner (its farthest, a0, is 0.5 away); a3 (0.3) keeps a1 (0.6 away).
    gapped = {r["generation1"]: r.get("generation2") for r in quark(rows, cfg.model_copy(update={"partner_min_gap": 0.6}), seed=0)}
    assert gapped == {" a0": " a1", " a1": " a0", " a2": None, " a3": " a1", " b0": None}
