"""Completion log-probs without a [batch, time, vocab] float32 tensor.

The transformer body runs once; the LM head then runs only at completion positions, a chunk of
positions at a time, each chunk upcast to float32 and recomputed in the backward pass, so peak
memory holds one [chunk, vocab] block instead of the whole sequence's logits, their float32 copy
and their log-softmax. A plain linear head (no bias, no adapter) goes through `HeadLogProbs`, which
saves only the log-normaliser and writes the gradient of the logits in one pass, and Quark's and
NLF's log-probs, KL and entropy through `HeadStats`, likewise; other heads (a bias, an adapter,
autocast) through activation checkpointing of the autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stages.training.losses import entropy as entropy_of
from stages.training.losses import token_kl, upcast

CHUNK = 512  # completion positions per LM-head block (512 x 49,152 x 4 B = 100 MB in float32)


def completion_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """Final hidden states at the positions that predict completion tokens: ([N, H], labels [N], mask [B, T-1])."""
    body = model.get_decoder()
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = completion_mask[:, 1:].bool()
    return hidden[:, :-1][mask], input_ids[:, 1:][mask], mask


class HeadLogProbs(torch.autograd.Function):
    """log softmax(h W^T)[y] per row, in float32 (float64 stays float64), saving h and the
    log-normaliser only. The backward recomputes the logits once and forms their gradient
    g (onehot(y) - softmax) in place: about 40% less LM-head time than checkpointing autograd's
    graph (upcast, logsumexp, gather), which re-runs that whole graph and then differentiates it."""

    @staticmethod
    def forward(ctx, h, weight, y):
        logits = upcast(F.linear(h, weight))
        lse = torch.logsumexp(logits, -1)
        ctx.save_for_backward(h, weight, y, lse)
        return logits.gather(-1, y[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, g):
        h, weight, y, lse = ctx.saved_tensors
        grad = upcast(F.linear(h, weight)).sub_(lse[:, None]).exp_().mul_(-g[:, None])  # -g softmax
        grad.scatter_add_(1, y[:, None], g[:, None].to(grad.dtype))  # + g at the label
        grad = grad.to(h.dtype)
        grad_h = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.T @ h if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None


class HeadStats(torch.autograd.Function):
    """Per row: log p(y), the exact KL to the reference and the entropy, from one LM-head matmul
    each for the policy and the reference, saving only their inputs. The backward recomputes both
    logits once and forms the gradient of the policy's logits z in closed form (p = softmax(z),
    r the reference's):
        d log p(y) / dz = onehot(y) - p
        d H / dz        = -p (log p + H)
        d KL(r||p) / dz = p - r                    (ref_policy)
        d KL(p||r) / dz = p (log p - log r - KL)   (policy_ref)
    The reference gets no gradient. Tokens the policy added (Quark's control tokens) get reference
    logits of -1e4, as losses.token_kl pads them."""

    @staticmethod
    def _log_probs(h, weight, ref_h, ref_weight):
        lp = torch.log_softmax(upcast(F.linear(h, weight)), -1)
        if ref_h is None:
            return lp, None
        zr = upcast(F.linear(ref_h, ref_weight))
        extra = weight.shape[0] - ref_weight.shape[0]
        if extra > 0:
            zr = F.pad(zr, (0, extra), value=-1e4)
        return lp, torch.log_softmax(zr, -1)

    @staticmethod
    def forward(ctx, h, weight, y, ref_h, ref_weight, ref_policy: bool):
        lp, lr = HeadStats._log_probs(h, weight, ref_h, ref_weight)
        p = lp.exp()
        ent = -(p * lp).sum(-1)
        logp = lp.gather(-1, y[:, None]).squeeze(-1)
        if lr is None:
            kl = torch.zeros_like(logp)
        elif ref_policy:
            kl = (lr.exp() * (lr - lp)).sum(-1)
        else:
            kl = (p * (lp - lr)).sum(-1)
        ctx.save_for_backward(h, weight, y, ref_h, ref_weight, ent, kl)
        ctx.ref_policy = ref_policy
        return logp, kl, ent

    @staticmethod
    def backward(ctx, g_logp, g_kl, g_ent):
        h, weight, y, ref_h, ref_weight, ent, kl = ctx.saved_tensors
        lp, lr = HeadStats._log_probs(h, weight, ref_h, ref_weight)
        p = lp.exp()
        grad = (lp + ent[:, None]).mul_(-g_ent[:, None]).sub_(g_logp[:, None]).mul_(p)
        grad.scatter_add_(1, y[:, None], g_logp[:, None].to(grad.dtype))
        if lr is not None:
            if ctx.ref_policy:
                grad.add_((p - lr.exp()).mul_(g_kl[:, None]))
            else:
                grad.add_((lp - lr).sub_(kl[:, None]).mul_(p).mul_(g_kl[:, None]))
        grad = grad.to(h.dtype)
        grad_h = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.T @ h if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None


def _fusable(head, h) -> bool:
    return (type(head) is nn.Linear and head.bias is None and head.weight.dtype == h.dtype
            and not torch.is_autocast_enabled(h.device.type))


def _label_logps(head, h, y):
    logits = upcast(head(h))
    return logits.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def _label_logps_kl_entropy(head, ref_head, h, y, ref_h, direction):
    logits = upcast(head(h))
    logp = logits.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    kl = token_kl(logits, ref_head(ref_h), direction) if ref_h is not None else torch.zeros_like(logp)
    return logp, kl, entropy_of(logits)


def _chunked(fn, *tensors, grad: bool):
    """Apply fn to CHUNK-row blocks of the tensors (None passes through); concatenate the outputs."""
    n = tensors[1].shape[0]
    outs = []
    for k in range(0, n, CHUNK):
        args = [t[k:k + CHUNK] if isinstance(t, torch.Tensor) else t for t in tensors]
        outs.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    if not outs:
        return None
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put per-position values back into a [B, T-1] grid, zeros off the completion."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask, values)


def shared_prompt_hidden(model, prompt_ids, prompt_mask, prompt_index, completion_ids, completion_mask):
    """Like completion_hidden, with each prompt run once for all the completions that continue it.

    prompt_ids [P, Tp] right-padded, every prompt at least one token; completion_ids [N, Tc]
    right-padded, row n continuing prompt prompt_index[n]. The prompts' KV cache is gathered per
    row and the completions attend to it (gradients flow back through it); a completion's first
    token is predicted from its prompt's last hidden state. Returns ([M, H], labels [M], mask [N, Tc]).
    """
    body = model.get_decoder()
    lengths = prompt_mask.sum(-1)
    out = body(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    last = out.last_hidden_state[torch.arange(len(prompt_ids), device=prompt_ids.device), lengths - 1][prompt_index]
    cache = out.cache
    cache.reorder_cache(prompt_index)  # index_select: differentiable, so every completion's gradient reaches its prompt
    positions = lengths[prompt_index, None] + torch.arange(completion_ids.shape[1], device=prompt_ids.device)
    attention = torch.cat([prompt_mask[prompt_index], completion_mask], 1)  # pads in the middle are masked out
    hidden = body(input_ids=completion_ids, attention_mask=attention, position_ids=positions,
                  cache=cache).last_hidden_state
    hidden = torch.cat([last[:, None], hidden[:, :-1]], 1)
    mask = completion_mask.bool()
    return hidden[mask], completion_ids[mask], mask


def completion_token_logps(model, input_ids, attention_mask, completion_mask, vocab: int | None = None):
    """log p(token | prefix) at completion positions, [B, T-1] (0 elsewhere), and the float mask."""
    return token_logps(model, *completion_hidden(model, input_ids, attention_mask, completion_mask), vocab)


def shared_prompt_token_logps(model, prompt_ids, prompt_mask, prompt_index, completion_ids, completion_mask,
                              vocab: int | None = None):
    """log p(token | prefix) of each completion token, [N, Tc], and the float mask (shared_prompt_hidden)."""
    return token_logps(model, *shared_prompt_hidden(model, prompt_ids, prompt_mask, prompt_index, completion_ids,
                                                    completion_mask), vocab)


def _check_labels(y, vocab: int | None) -> None:
    if vocab is not None and bool((y >= vocab).any()):
        raise ValueError(f"a completion holds token id {int(y.max())}, outside the predicted vocabulary of {vocab}")


def token_logps(model, h, y, mask, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head's log-probs of labels y at hidden states h, a chunk at a time, scattered into
    mask's grid; with `vocab`, normalised over token ids below it (completion_token_stats says why)."""
    head = model.get_output_embeddings()
    _check_labels(y, vocab)
    grad = torch.is_grad_enabled() and h.requires_grad
    if _fusable(head, h):
        weight = head.weight[:vocab]
        logp = _chunked(lambda hh, yy: HeadLogProbs.apply(hh, weight, yy), h, y, grad=False)
    else:
        logits_of = head if vocab is None else (lambda x: head(x)[..., :vocab])
        logp = _chunked(lambda hh, yy: _label_logps(logits_of, hh, yy), h, y, grad=grad)
    if logp is None:
        logp = h.new_zeros(0, dtype=torch.float32)
    return scatter(logp, mask), mask.float()


def completion_token_stats(model, batch: dict, ref_model=None, ref_batch: dict | None = None, direction: str = "ref_policy",
                           vocab: int | None = None):
    """Per-token log-probs, exact KL to the reference (when ref_model is given) and entropy, each [B, T-1].

    The reference sees `ref_batch` (the unconditioned prompt); both batches must hold the same
    completion tokens in the same order, which the collate functions guarantee. `vocab` limits the
    policy's distribution to token ids below it (Quark's control tokens, added last, are inputs
    only: never predicted, sampled or part of the KL and entropy).
    """
    h, y, mask = completion_hidden(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ref_h, ref_head = None, None
    if ref_model is not None:
        with torch.no_grad():
            ref_h, ref_y, _ = completion_hidden(ref_model, ref_batch["input_ids"], ref_batch["attention_mask"],
                                                ref_batch["completion_mask"])
        if not torch.equal(ref_y, y):
            raise RuntimeError("policy and reference batches hold different completion tokens")
        ref_head = ref_model.get_output_embeddings()
    head = model.get_output_embeddings()
    _check_labels(y, vocab)
    grad = torch.is_grad_enabled() and h.requires_grad
    if _fusable(head, h) and (ref_head is None or _fusable(ref_head, ref_h)):
        weight = head.weight[:vocab]
        ref_w = ref_head.weight[:vocab] if ref_head is not None else None
        logp, kl, ent = _chunked(lambda hh, yy, rh: HeadStats.apply(hh, weight, yy, rh, ref_w, direction == "ref_policy"),
                                 h, y, ref_h, grad=False)
    else:
        policy_head = head if vocab is None else (lambda x: head(x)[..., :vocab])
        ref_policy_head = ref_head if vocab is None or ref_head is None else (lambda x: ref_head(x)[..., :vocab])
        logp, kl, ent = _chunked(lambda hh, yy, rh: _label_logps_kl_entropy(policy_head, ref_policy_head, hh, yy, rh, direction),
                                 h, y, ref_h, grad=grad)
    return scatter(logp, mask), scatter(kl, mask), scatter(ent, mask), mask.float()
