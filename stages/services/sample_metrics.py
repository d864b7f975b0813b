"""What the papers report about a policy's samples: the mean with a bootstrap 95% interval over
prompts, reward quantiles, distinct-n (diversity), perplexity under the reference (fluency, as
Quark reports it), and the order of rewards across control tokens (controllability)."""

from __future__ import annotations

import math

import numpy as np


def bootstrap_ci(values: list[float | None], seed: int, resamples: int = 2000) -> tuple[float, float] | None:
    """Percentile 95% interval of the mean, resampling the prompts (one value each) with replacement."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def per_prompt_means(values: list[float | None], k: int) -> list[float | None]:
    """The mean of each prompt's k consecutive values (its samples), ignoring unknown ones: None
    where a prompt has none. The unit the bootstrap resamples."""
    out = []
    for i in range(0, len(values), k):
        known = [v for v in values[i:i + k] if v is not None and math.isfinite(v)]
        out.append(sum(known) / len(known) if known else None)
    return out


def paired_differences(a: list[float | None], b: list[float | None]) -> list[float]:
    """a - b over the prompts both scored (the same prompts and sampling seeds)."""
    return [x - y for x, y in zip(a, b) if x is not None and y is not None]


def quantiles(values: list[float | None], qs=(0.1, 0.25, 0.5, 0.75, 0.9)) -> dict[str, float]:
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(x):
        return {}
    return {f"p{int(q * 100)}": float(v) for q, v in zip(qs, np.quantile(x, qs))}


def distinct_n(token_lists: list[list[int]], n: int) -> float | None:
    """Distinct n-grams over all n-grams of the samples (Li et al., 2016), on token ids."""
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def perplexity(reference_logprobs: list[float], tokens: list[int]) -> float | None:
    """exp of the reference's mean negative log-likelihood per generated token, over all samples."""
    total = sum(tokens)
    return math.exp(-sum(reference_logprobs) / total) if total else None


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation (average ranks for ties); None when either side is constant."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in set(v):  # average ranks of ties
            m = np.array(v) == value
            r[m] = r[m].mean()
        return r

    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(np.corrcoef(ranks(list(xs)), ranks(list(ys)))[0, 1])
