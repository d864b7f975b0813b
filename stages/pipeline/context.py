"""What a stage function sees and returns, and how a stage declares itself. Imports nothing else
of ours, so stages, the runner and the registry can all depend on it.

    @stage("sample", version="3", inputs=("load_prompts@0", "train@prev"), identity=identity)
    def run(ctx: StageContext, cfg: SampleConfig) -> StageOutput: ...

`inputs` names the upstream stages it reads when they are part of the flow: "name" (same round),
"name@0" (round 0, for stages that run once), "name@prev" (the previous round; none in round 0) or
"name@earlier" (every earlier round's, as inputs "name@0", "name@1", ...). A stage may name its own
earlier rounds ("evaluate@0": round 0's evaluate, none in round 0 itself).
Bump `version` when a change alters what the stage writes: it enters the fingerprint. The config
section is the one named like the stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow as pa

if TYPE_CHECKING:
    from stages.pipeline.store import ArtifactStore


@dataclass(frozen=True)
class StageSpec:
    name: str
    fn: Callable
    version: str
    inputs: tuple[str, ...]
    identity: Callable | None = None  # outside inputs that enter the fingerprint (a data file's hash)
    once: bool = False  # runs in round 0 only (load_prompts); later rounds read that artifact


def stage(name: str, version: str, inputs: tuple[str, ...] = (), identity: Callable | None = None,
          once: bool = False):
    """Declare a stage function: its spec rides on the function as `fn.spec` (the registry reads it)."""
    def wrap(fn):
        fn.spec = StageSpec(name, fn, version, tuple(inputs), identity, once)
        return fn
    return wrap


@dataclass
class StageOutput:
    """What a stage function returns: its table, and metrics for the manifest."""

    table: pa.Table
    metrics: dict = field(default_factory=dict)


@dataclass
class Upstream:
    """A complete artifact of an earlier stage, as a stage sees its input."""

    stage: str
    path: str
    manifest: dict
    store: "ArtifactStore"

    def table(self) -> pa.Table:
        return self.store.read_table(self.path)

    def local_dir(self) -> Path:
        return self.store.local_dir(self.path)

    def model_dir(self) -> Path:
        """The model a train artifact holds (a from_pretrained-able folder)."""
        return self.local_dir() / "model"


@dataclass
class StageContext:
    stage: str
    experiment: str
    round: int
    seed: int
    workdir: Path  # where the stage writes its files besides the table (a model, logs)
    resume_dir: Path  # survives a crash or kill of this stage (same fingerprint); removed on success
    inputs: dict[str, Upstream]
    log: logging.Logger
    # What the stage's identity function resolved for the fingerprint (a hub dataset's commit): the
    # stage reads exactly that, never a newer state of the outside world.
    identity: dict = field(default_factory=dict)

    # The seeds a stage derives from the config's, in one place.
    @property
    def round_seed(self) -> int:
        """Fresh each round (else every round would draw the same samples), the same on a re-run;
        the runner seeds torch, NumPy and `random` with it before the stage starts."""
        return self.seed + 1000 * self.round

    @property
    def heldout_seed(self) -> int:
        """The same in every round, so held-out generations of successive rounds' policies differ
        by the policy, not by the random draw (common random numbers)."""
        return self.seed + 7
