"""Teacher-forced scoring: the one implementation of "log-probs of these completions under this
model", used by the reference stage (cached reference columns), reweight (importance weights) and
evaluate (KL to the reference)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from stages.services.models import load_causal_lm
from stages.training.objectives import batch_token_logps, sequences
from stages.data.tokens import Sequence


@torch.no_grad()
def score(model, seqs: list[Sequence], pad_id: int, batch_size: int, limits: tuple[int, int] | None = None,
          per_token: bool = False, desc: str = "score", vocab: int | None = None):
    """Summed (and optionally per-token) completion log-probs, in the order of `seqs`.

    limits = (max_prompt, max_length) applies the trainer's length rules; None scores the
    sequences whole (sampled ones, exactly as drawn). The model computes in its own parameters' dtype
    (training.precision.cast_for_compute makes a bf16 one). Sequences of one prompt are batched together
    and share its forward pass (the trainer's shared prompts); longest groups first. `vocab`
    normalises over token ids below it (a Quark policy's original vocabulary)."""
    if limits is None:
        longest_prompt = max((len(s.prefix) + len(s.prompt) for s in seqs), default=0)
        limits = (max(1, longest_prompt), max(1, longest_prompt) + max((len(s.completion) for s in seqs), default=0))
    embedded = model.get_input_embeddings().weight.shape[0]
    top = max((max((*s.prefix, *s.prompt, *s.completion), default=-1) for s in seqs), default=-1)
    if top >= embedded:  # an embedding lookup would fail with a bare IndexError
        raise ValueError(f"{desc}: token id {top} is outside the model's vocabulary of {embedded} (a token added to "
                         f"the policy, such as a Quark control token, that this model does not have)")
    keys = [(s.prefix, tuple(s.prompt)) for s in seqs]  # a sequence's prompt group, built once
    longest: dict[tuple, int] = {}
    for k, s in zip(keys, seqs):
        longest[k] = max(longest.get(k, 0), len(s.prompt) + len(s.completion))
    order = sorted(range(len(seqs)), key=lambda i: (-longest[keys[i]], keys[i], -len(seqs[i].completion)))
    sums: list[float] = [0.0] * len(seqs)
    tokens: list[list[float] | None] = [None] * len(seqs)
    for k in tqdm(range(0, len(order), batch_size), desc=desc, disable=None):
        idx = order[k:k + batch_size]
        batch = sequences([seqs[i] for i in idx], pad_id, *limits, share_prompt=True)
        logps, mask = batch_token_logps(model, batch, vocab)
        for j, i in enumerate(idx):
            sums[i] = float(logps[j].sum())
            if per_token:
                tokens[i] = logps[j][mask[j].bool()].tolist()
    return sums, tokens


def sequence_logps(path, prompt_ids: list[list[int]], completion_ids: list[list[int]], batch_size: int = 16) -> list[float]:
    """Summed log-probs of each completion given its prompt under the model at `path`, on exactly
    these token ids (an empty completion sums to 0)."""
    model = load_causal_lm(path).eval()
    seqs = [Sequence(list(p), list(c)) for p, c in zip(prompt_ids, completion_ids)]
    return score(model, seqs, 0, batch_size, desc="score")[0]
