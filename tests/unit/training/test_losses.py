"""Loss numerics pinned against hand computations (float64) and a gradient check."""

import math

import torch

from stages.training.losses import bradley_terry, sft_nll, token_logprobs, weighted_mean


def test_bradley_terry_matches_hand_values():
    s_c = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)
    s_r = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    expected = [math.log(1 + math.exp(-(c - r - 0.5))) for c, r in zip(s_c.tolist(), s_r.tolist())]
    assert torch.allclose(bradley_terry(s_c, s_r, margin=0.5), torch.tensor(expected, dtype=torch.float64))
    assert math.isclose(bradley_terry(torch.zeros(1), torch.zeros(1)).item(), math.log(2), rel_tol=1e-6)


def test_token_logprobs_and_sft_nll_mask_the_prompt():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4], [0, 0, 1, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.float64)
    lp = token_logprobs(logits, labels, mask)
    for b in range(2):
        for t in range(4):
            manual = logits[b, t, labels[b, t]] - torch.logsumexp(logits[b, t], -1)
            assert math.isclose(lp[b, t].item(), manual.item() * mask[b, t].item(), abs_tol=1e-6)
    nll = sft_nll(lp, mask)
    assert math.isclose(nll[0].item(), -lp[0, 1:].sum().item() / 3, rel_tol=1e-6)
    assert math.isclose(nll[1].item(), -lp[1, 2].item(), rel_tol=1e-6)


def test_weighted_mean_zero_weight_removes_and_double_weight_duplicates():
    loss = torch.tensor([1.0, 2.0, 7.0])
    assert weighted_mean(loss, torch.tensor([1.0, 1.0, 0.0])).item() == 1.5
    doubled = weighted_mean(loss, torch.tensor([2.0, 1.0, 1.0]))
    duplicated = weighted_mean(torch.tensor([1.0, 1.0, 2.0, 7.0]), torch.ones(4))
    assert torch.allclose(doubled, duplicated)
    assert weighted_mean(loss, torch.zeros(3)).item() == 0.0


def test_gradients_match_finite_differences():
    s = (torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True))
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c, r: weighted_mean(bradley_terry(c, r, 0.3), w), s)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 2, 3], [0, 1, 2]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: sft_nll(token_logprobs(x, labels, mask), mask).sum(), (logits,))
