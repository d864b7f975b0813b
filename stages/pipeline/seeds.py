"""The one place a stage's random state is set: the runner before every stage, and the processes
a stage launches (distributed training) before they build anything."""

from __future__ import annotations


def seed_everything(seed: int) -> None:
    """Every stage starts from the same RNG state (new heads, sampling, shuffles are reproducible)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
