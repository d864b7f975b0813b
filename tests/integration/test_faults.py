"""The reliability campaign, short: SIGKILLs at seeded random moments of a two-round online flow and
flipped bytes in its artifacts; every run must end complete with the reference's fingerprints and
identical tables and weights (benchmarks/fault_campaign.py runs the long version)."""

from __future__ import annotations

import importlib.util
import os
import sys

from conftest import ROOT, needs_prepared

pytestmark = needs_prepared


def load_campaign():
    spec = importlib.util.spec_from_file_location("fault_campaign", ROOT / "benchmarks" / "fault_campaign.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_campaign"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_kills_and_corruptions_lose_nothing(tmp_path):
    campaign = load_campaign()
    kills = int(os.environ.get("ALIGN_FAULT_KILLS", "2"))
    corruptions = int(os.environ.get("ALIGN_FAULT_CORRUPTIONS", "2"))
    tally = campaign.campaign(str(tmp_path / "run"), dict(os.environ), kills, corruptions,
                              seed=int(os.environ.get("ALIGN_FAULT_SEED", "0")))
    assert not tally.problems, tally.problems
    assert tally.kills_survived == kills and tally.corruptions_detected == corruptions
