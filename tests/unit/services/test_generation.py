"""The sampler: NucleusSampler draws from exactly the distribution of transformers' temperature
and top-p warpers, on each of its paths (nucleus within the 256 likeliest tokens, within 4096, or
found by a full sort)."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from stages.services.generation import NucleusSampler

V, DRAWS = 5000, 2000


def rows() -> torch.Tensor:
    """Three shapes of next-token distribution, tokens in a random order: mass decaying fast (the
    nucleus within 256 tokens), slowly (within 4096) and flat (neither: a full sort)."""
    g = torch.Generator().manual_seed(0)
    rank = torch.arange(V, dtype=torch.float32)
    shapes = [-0.05 * rank, -0.001 * rank, 0.01 * torch.randn(V, generator=g)]
    return torch.stack([s[torch.randperm(V, generator=g)] for s in shapes])


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 0.9, 0), (0.7, 0.95, 0), (1.3, 0.5, 0), (1.0, 1.0, 0),
                                                       (1.0, 0.9, 50), (1.0, 1.0, 50)])
def test_draws_follow_the_warpers_distribution_on_every_path(temperature, top_p, top_k):
    scores = TemperatureLogitsWarper(temperature)(None, rows().clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    want = TopPLogitsWarper(top_p)(None, scores).softmax(-1)
    scores = rows()
    torch.manual_seed(1)
    sampler = NucleusSampler(temperature, top_p, top_k)
    out = sampler(None, scores.repeat_interleave(DRAWS, 0))
    assert torch.isfinite(out).sum(-1).eq(1).all()  # one finite score per row: greedy takes the draw
    draws = out.argmax(-1).view(3, DRAWS)
    for shape in range(3):
        assert (want[shape, draws[shape]] > 0).all(), "a draw outside the warpers' nucleus"
        freq = torch.bincount(draws[shape], minlength=V).float() / DRAWS
        top = want[shape].topk(5).indices
        p = want[shape, top]
        bound = 4 * (p * (1 - p) / DRAWS).sqrt() + 1e-3
        assert ((freq[top] - p).abs() <= bound).all(), (shape, freq[top], p)
        kept = int((want[shape] > 0).sum())
        # the nucleus is as large as the warpers' (the flat row's draws spread over all of it)
        if shape == 2 and top_p < 1:
            assert torch.unique(draws[shape]).numel() > 0.5 * min(kept, DRAWS)


def test_seeded_draws_repeat():
    scores = rows().repeat_interleave(8, 0)
    sampler = NucleusSampler(1.0, 0.9)
    torch.manual_seed(3)
    a = sampler(None, scores).argmax(-1)
    torch.manual_seed(3)
    assert torch.equal(a, sampler(None, scores).argmax(-1))
