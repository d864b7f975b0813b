"""The one place a stage's random state is set: the runner before every stage, and the processes
a stage launches (distributed training) before they build anything; and the seeded hashes that
order and split rows the same way on every machine and run (Python's hash() differs per process)."""

from __future__ import annotations

import hashlib


def seeded_hash(seed: int, key: str) -> str:
    """A stable pseudo-random sort key of `key` under `seed`: sha256 of "seed\\0key", in hex."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def seeded_unit(seed: int, key: str) -> float:
    """seeded_hash as a number in [0, 1) (its first 8 bytes): a stable coin for splits."""
    return int(seeded_hash(seed, key)[:16], 16) / 2**64


def seed_everything(seed: int) -> None:
    """Every stage starts from the same RNG state (new heads, sampling, shuffles are reproducible)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
