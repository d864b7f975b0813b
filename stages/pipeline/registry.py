"""The stages by name, in flow order. Each stage module declares its `run(ctx, cfg) -> StageOutput`
with `@stage(...)` (stages/pipeline/context.py); this is the one list a new stage is added to."""

from __future__ import annotations

import functools

from stages.pipeline.context import StageSpec


def parse_input(ref: str) -> tuple[str, str]:
    """"train@prev" -> ("train", "prev"); "load_prompts@0" -> ("load_prompts", "0"); "x" -> ("x", "")."""
    name, _, when = ref.partition("@")
    return name, when


def input_rounds(when: str, round_: int) -> list[int]:
    """The rounds whose artifact an input names: "" this one, "prev" the one before (none in round
    0), "0" round 0, "earlier" every round before this one."""
    if when == "prev":
        return [round_ - 1] if round_ > 0 else []
    if when == "earlier":
        return list(range(round_))
    if when == "0":
        return [0]
    return [round_]


@functools.cache
def stage_specs() -> dict[str, StageSpec]:
    # Imported here: stage modules pull in torch and transformers, which `import stages` should not.
    from stages import annotate, build_pool, data_pool, evaluate, load_prompts, reference, reweight, sample, train

    mods = [load_prompts, sample, annotate, reweight, data_pool, build_pool, reference, train, evaluate]
    return {m.run.spec.name: m.run.spec for m in mods}


def downstream_of(stage: str, flow: list[str]) -> list[str]:
    """`stage` and every stage in `flow` that reads it in the same round, directly or not.
    (Later rounds follow by themselves: their inputs' run ids change.)"""
    out = [stage]
    for name in flow[flow.index(stage) + 1:]:
        if any(parse_input(i)[0] in out and parse_input(i)[1] not in ("prev", "earlier") for i in stage_specs()[name].inputs):
            out.append(name)
    return out
