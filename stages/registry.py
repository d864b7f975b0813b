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
    inputs: tuple[str, ...]  # upstream stages it reads, when they are part of the flow
    identity: Callable | None = None  # outside inputs that enter the fingerprint (a data file's hash)


@functools.cache
def stage_specs() -> dict[str, StageSpec]:
    # Imported here: stage modules pull in torch and transformers, which `import stages` should not.
    from stages import build_pool, evaluate, load_prompts, reference, train

    mods = [load_prompts, build_pool, reference, train, evaluate]
    return {
        m.NAME: StageSpec(m.NAME, m.run, m.VERSION, tuple(m.INPUTS), getattr(m, "identity", None))
        for m in mods
    }


def downstream_of(stage: str, flow: list[str]) -> list[str]:
    """`stage` and every stage in `flow` that reads it, directly or not."""
    out = [stage]
    for name in flow[flow.index(stage) + 1:]:
        if any(i in out for i in stage_specs()[name].inputs):
            out.append(name)
    return out
