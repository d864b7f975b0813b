"""The teacher-forced conditioning probe of a Quark or NLF policy: does its conditioning mean what
it was trained to mean, on samples it never trained on? Far cheaper and less noisy than sampling
under every control, because it scores given samples instead of drawing new ones.

- Held-out pairs: two base samples of one held-out prompt whose rewards differ by at least
  `min_gap`; the probe asks whether d(y) = log p(y | best control) - log p(y | worst control) is
  larger for the better one. The fraction of pairs where it is (ties count a half) is 1 when the
  conditioning ranks unseen samples as the annotator does, 0.5 by chance.
- Match on the training pool: whether a trained sample's own control makes it likelier than every
  other control does. High here and chance on held-out pairs means memorised, not learnt.
"""

from __future__ import annotations

from stages.data.tokens import of_record, text_ids
from stages.pipeline.seeds import seeded_hash
from stages.services.scoring import score


def control_logps(model, tokenizer, objective, records: list[dict], controls: list[str],
                  batch_size: int = 16) -> list[list[float]]:
    """log p(generation1 | control's prefix + prompt) of each record under each control, by the
    objective's own prefix, token rules and vocabulary: [record][control]."""
    seqs = [of_record(tokenizer, r, "generation1", objective.condition_prefix(c, tokenizer))
            for c in controls for r in records]
    limits = (objective.max_prompt, objective.cfg.max_length)
    sums, _ = score(model, seqs, tokenizer.pad_token_id, batch_size, limits, desc="probe", vocab=objective.vocab)
    n = len(records)
    return [[sums[k * n + i] for k in range(len(controls))] for i in range(n)]


def heldout_pairs(rows: list[dict], min_gap: float) -> list[tuple[int, int]]:
    """(better, worse) indices of rows of one prompt whose `score`s differ by at least min_gap."""
    by_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get("score") is not None:
            by_prompt.setdefault(r["prompt_id"], []).append(i)
    pairs = []
    for idx in by_prompt.values():
        for a, i in enumerate(idx):
            for j in idx[a + 1:]:
                if abs(rows[i]["score"] - rows[j]["score"]) >= min_gap:
                    pairs.append((i, j) if rows[i]["score"] > rows[j]["score"] else (j, i))
    return pairs


def pairwise_outcomes(margins: list[float], pairs: list[tuple[int, int]]) -> list[float]:
    """Per pair: 1 when the better sample's margin d is the larger, 0.5 on a tie, else 0."""
    return [1.0 if margins[b] > margins[w] else 0.5 if margins[b] == margins[w] else 0.0 for b, w in pairs]


def match_outcomes(logps: list[list[float]], own: list[int]) -> list[float]:
    """Per record: 1 when its own control (an index into the controls) is the strict argmax."""
    out = []
    for row, k in zip(logps, own):
        out.append(1.0 if all(row[k] > v for j, v in enumerate(row) if j != k) else 0.0)
    return out


def heldout_probe(model, tokenizer, objective, rows: list[dict], controls: list[str], min_gap: float,
                  batch_size: int = 16) -> tuple[list[float], int]:
    """Outcomes of the held-out pairs of `rows` (records with prompt_id, prompt, generation1[_ids]
    and score) between the best (first) and worst (last) control, and how many samples it scored."""
    pairs = heldout_pairs(rows, min_gap)
    used = sorted({i for p in pairs for i in p})
    if not used:
        return [], 0
    logps = control_logps(model, tokenizer, objective, [rows[i] for i in used], [controls[0], controls[-1]], batch_size)
    margin = {i: best - worst for i, (best, worst) in zip(used, logps)}
    return pairwise_outcomes([margin.get(i, 0.0) for i in range(len(rows))], pairs), len(used)


def pool_match(model, tokenizer, objective, records: list[dict], controls: list[str], limit: int, seed: int,
               batch_size: int = 16) -> tuple[list[float], float | None]:
    """Outcomes of the match test on up to `limit` training records conditioned on one of
    `controls` (a seeded draw), and its chance level: the share of the commonest control among
    them (what always naming that control scores)."""
    key = objective.condition_key
    known = [r for r in records if r.get(key) in controls]
    known.sort(key=lambda r: seeded_hash(seed, f"{r['prompt_id']}\x00{r.get('generation1')}"))
    known = known[:limit]
    if not known:
        return [], None
    own = [controls.index(r[key]) for r in known]
    logps = control_logps(model, tokenizer, objective, known, controls, batch_size)
    return match_outcomes(logps, own), max(own.count(k) for k in set(own)) / len(own)


def base_records(tokenizer, rows: list[dict]) -> list[dict]:
    """evaluate's held-out rows as records of their base samples: the prompt's own tokens (the
    training budget cuts them as it cut the pool's), the base's sampled ids where recorded."""
    return [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "prompt_ids": text_ids(tokenizer, r["prompt"]),
             "generation1": r["base_completion"], "generation1_ids": r.get("base_completion_ids"),
             "score": r.get("base_score")} for r in rows if r.get("base_completion") is not None]
