"""The stages by name: each is a plain function `run(ctx, cfg) -> StageOutput`, a code version that
enters the fingerprint (bump it when a change alters what the stage writes), and its inputs."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StageSpec:
    name: str
    fn: Callable
    version: str
    # Upstream stages it reads when they are part of the flow: "name" (same round), "name@0"
    # (round 0, for stages that run once) or "name@prev" (the previous round; none in round 0).
    inputs: tuple[str, ...]
    identity: Callable | None = None  # outside inputs that enter the fingerprint (a data file's hash)
    once: bool = False  # runs in round 0 only (load_prompts); later rounds read that artifact


def parse_input(ref: str) -> tuple[str, str]:
    """"train@prev" -> ("train", "prev"); "load_prompts@0" -> ("load_prompts", "0"); "x" -> ("x", "")."""
    name, _, when = ref.partition("@")
    return name, when


def input_round(when: str, round_: int) -> int | None:
    if when == "prev":
        return round_ - 1 if round_ > 0 else None
    if when == "0":
        return 0
    return round_


@functools.cache
def stage_specs() -> dict[str, StageSpec]:
    # Imported here: stage modules pull in torch and transformers, which `import stages` should not.
    from stages import annotate, build_pool, evaluate, load_prompts, reference, reweight, sample, train

    mods = [load_prompts, sample, annotate, reweight, build_pool, reference, train, evaluate]
    return {
        m.NAME: StageSpec(m.NAME, m.run, m.VERSION, tuple(m.INPUTS), getattr(m, "identity", None),
                          getattr(m, "ONCE", False))
        for m in mods
    }


def downstream_of(stage: str, flow: list[str]) -> list[str]:
    """`stage` and every stage in `flow` that reads it in the same round, directly or not.
    (Later rounds follow by themselves: their inputs' run ids change.)"""
    out = [stage]
    for name in flow[flow.index(stage) + 1:]:
        if any(parse_input(i)[0] in out and parse_input(i)[1] != "prev" for i in stage_specs()[name].inputs):
            out.append(name)
    return out
