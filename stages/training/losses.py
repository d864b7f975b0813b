"""Losses as pure functions of tensors that return per-example values.

The trainer multiplies each example's loss by its weight and divides by the batch's weight sum
(`weighted_mean`), so a weight of 0 removes an example exactly. Conventions (DESIGN.md): a
sequence log-prob is the sum over completion tokens, prompt tokens masked, computed in float32.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(label_t | <t) per position, zero where mask is 0. logits [B,T,V] already aligned to labels [B,T]."""
    logits = upcast(logits)
    logp = -F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    return logp * mask


def sft_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Completion-only negative log-likelihood, averaged over each example's completion tokens."""
    return -token_logps.sum(-1) / mask.sum(-1).clamp(min=1)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Reward-model loss -log sigmoid(s_c - s_r - margin) per pair."""
    return -F.logsigmoid(chosen - rejected - margin)


def weighted_mean(per_example: torch.Tensor, weights: torch.Tensor, total_weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum(w * loss) / sum(w); an all-zero-weight batch contributes 0 (not NaN). `total_weight`
    replaces sum(w) when these examples are one process's shard of a larger batch."""
    per_example = upcast(per_example)  # a bf16 model's losses are reduced in float32
    weights = weights.to(per_example.dtype)
    total = weights.sum() if total_weight is None else total_weight.to(per_example.dtype)
    return (per_example * weights).sum() / total.clamp(min=torch.finfo(per_example.dtype).tiny)


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO family on sequence log-probs; returns per-pair losses and the implicit rewards.

    logits = (pi_c - pi_r) - (ref_c - ref_r)
    sigmoid: -(1 - eps) log sigmoid(beta logits) - eps log sigmoid(-beta logits)   (eps > 0: conservative DPO)
    ipo:     (logits - 1 / (2 beta))^2                                          (Azar et al., 2023)
    hinge:   max(0, 1 - beta logits)                                            (SLiC, Zhao et al., 2023)
    Reference-free DPO passes zeros for ref_c and ref_r.
    """
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    elif loss == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def kto_loss(pi: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, pi_kl: torch.Tensor, ref_kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al., 2024): per-example losses, the log-ratio rewards, and the reference point z0.

    z0 is the mean log-ratio of mismatched prompt/completion pairs (pi_kl, ref_kl), detached and
    clamped at 0; desirable: lambda_D (1 - sigmoid(beta (r - z0))), undesirable: lambda_U (1 - sigmoid(beta (z0 - r))).
    `mean`: how the batch's mean is taken (across processes under DDP: distributed_ops.batch_mean).
    """
    z0 = mean(pi_kl - ref_kl).detach().clamp(min=0)
    r = pi - ref
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses, (beta * r).detach(), z0


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, direction: str) -> torch.Tensor:
    """Exact per-token KL over the vocabulary. "ref_policy" = KL(ref || policy), Quark's and NLF's
    choice (mode-covering: keeps mass wherever the reference has it); "policy_ref" = KL(policy || ref)."""
    extra = policy_logits.shape[-1] - ref_logits.shape[-1]
    if extra > 0:  # tokens the policy added (Quark's control tokens): the reference gives them ~0 mass
        ref_logits = F.pad(upcast(ref_logits), (0, extra), value=-1e4)
    lp = torch.log_softmax(upcast(policy_logits), -1)
    lr = torch.log_softmax(upcast(ref_logits), -1)
    if direction == "ref_policy":
        return (lr.exp() * (lr - lp)).sum(-1)
    return (lp.exp() * (lp - lr)).sum(-1)


def sampled_kl(logp: torch.Tensor, ref_logp: torch.Tensor, direction: str) -> torch.Tensor:
    """Cheap per-token KL estimate from the sampled tokens' log-probs only (Schulman's k3,
    (ratio - 1) - log ratio >= 0). Unbiased when the tokens were drawn from the first distribution
    of `direction`; with pool tokens from an earlier policy it is an approximation."""
    log_ratio = (ref_logp - logp) if direction == "policy_ref" else (logp - ref_logp)
    return torch.expm1(log_ratio) - log_ratio


def entropy(logits: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(upcast(logits), -1)
    return -(lp.exp() * lp).sum(-1)


def conditioned_nll(token_logps: torch.Tensor, token_kl_: torch.Tensor, token_entropy: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float, entropy_coef: float) -> torch.Tensor:
    """Quark / NLF: per example, token means of NLL + kl_coef * KL - entropy_coef * entropy."""
    n = mask.sum(-1).clamp(min=1)
    mean = lambda x: (x * mask).sum(-1) / n  # noqa: E731
    return mean(-token_logps) + kl_coef * mean(token_kl_) - entropy_coef * mean(token_entropy)


def condition_contrast(own_logp: torch.Tensor, other_logp: torch.Tensor) -> torch.Tensor:
    """GeDi's discriminative loss (Krause et al., 2020) between two conditions: -log sigmoid(log
    p(y | own condition) - log p(y | another condition)), the sequences' summed log-probs: the
    log-likelihood of telling the sample's condition from the other by Bayes' rule, equal priors."""
    return -F.logsigmoid(own_logp - other_logp)


def rloo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, rewards: torch.Tensor, groups: torch.Tensor,
              kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE with a leave-one-out baseline (RLOO, Ahmadian et al., 2024) and a KL penalty.

    Each sample's reward is penalised by kl_coef * (logp - ref_logp); its baseline is the mean
    penalised reward of the other samples of the same prompt (`groups` holds a prompt index per
    sample). A prompt with a single sample gets advantage 0. Returns per-sample losses, advantages.
    """
    shaped = rewards - kl_coef * (logp - ref_logp).detach()
    one_hot = (groups[:, None] == groups[None, :]).to(shaped.dtype)
    size = one_hot.sum(-1)
    others = (one_hot @ shaped - shaped) / (size - 1).clamp(min=1)
    advantage = torch.where(size > 1, shaped - others, torch.zeros_like(shaped)).detach()
    return -advantage * logp, advantage


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each sample's reward minus the mean reward of its prompt's group
    (`groups` holds a prompt index per sample), divided by the group's standard deviation (unbiased,
    + eps) when `scale`; Dr. GRPO leaves it out (scale=False). A lone sample gets 0."""
    one_hot = (groups[:, None] == groups[None, :]).to(rewards.dtype)
    size = one_hot.sum(-1)
    centred = rewards - one_hot @ rewards / size
    if scale:
        std = (one_hot @ centred.square() / (size - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    return torch.where(size > 1, centred, torch.zeros_like(centred)).detach()


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                    mask: torch.Tensor, eps_low: float, eps_high: float, beta: float) -> dict[str, torch.Tensor]:
    """GRPO's per-token loss, [B, T] (zero off the mask): the clipped surrogate on the ratio
    pi / pi_old of the sampled tokens (PPO's, with the sequence's advantage at every token), plus
    beta times the k3 estimate of KL(pi || ref), exp(ref - logp) - (ref - logp) - 1. Also the
    per-token k3 and whether the clip was active (for metrics)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        log_ratio = ref_logp - logp
        kl = torch.exp(log_ratio) - log_ratio - 1
        loss = loss + beta * kl
    return {"loss": loss * mask, "kl": kl * mask, "clipped": (clipped < unclipped).to(logp.dtype) * mask,
            "ratio": ratio * mask}
