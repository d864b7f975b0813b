"""Running annotator steps over (prompt, completion) pairs, with the checks every caller needs:
the annotate stage (the round's samples) and evaluate (the trained and the base policy's samples)."""

from __future__ import annotations

import math

from stages.annotators import ANNOTATORS
from stages.pipeline.errors import BadInput


def checked_scores(values, n: int, where: str, allow_missing: bool) -> list[float | None]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise BadInput(f"{where} returned {got} scores for {n} samples")
    out = []
    for i, v in enumerate(values):
        if v is None and allow_missing:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)) or math.isinf(float(v)):
            raise BadInput(f"{where} returned {v!r} for sample {i}: scores must be finite numbers")
        out.append(float(v))
    return out


class Steps:
    """Annotator steps, each built on first use and kept: a model loads once however many times
    the steps run (evaluate scores the trained policy, the base policy and every control)."""

    def __init__(self, steps):
        self.steps = list(steps)
        self._built: dict[int, object] = {}

    def __call__(self, prompts: list[str], completions: list[str], where: str, log=None,
                 feedback: bool = True) -> tuple[list[float | None], list[str | None]]:
        return run_steps(self.steps, prompts, completions, where, log, feedback, self._built)


def run_steps(steps, prompts: list[str], completions: list[str], where: str, log=None,
              feedback: bool = True, built: dict | None = None) -> tuple[list[float | None], list[str | None]]:
    """Scores and feedback from the steps in order: a later scoring step replaces the scores, a
    step that only writes feedback (template_feedback) words the scores so far. An annotator that
    raises, or returns NaN or the wrong number of scores, is a one-line BadInput naming the step.
    feedback=False skips the steps that only write feedback. `built` keeps annotators between calls."""
    n = len(prompts)
    score: list = [None] * n
    words: list = [None] * n
    built = {} if built is None else built
    for i, step in enumerate(steps):
        cls = ANNOTATORS[step.kind]
        if not (cls.scores or feedback):
            continue
        name = f"{where}.steps[{i}] ({step.kind}{': ' + step.callable if step.kind == 'rule' else ''})"
        if log:
            log.info("%s: %s on %d samples", where, step.kind, n)
        try:
            if i not in built:
                built[i] = cls(step)
            out = built[i](prompts, completions, scores=score)
        except BadInput as e:
            raise BadInput(str(e) if str(e).startswith(where) else f"{name}: {e}") from e
        except Exception as e:
            raise BadInput(f"{name} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if cls.scores:
            score = checked_scores(out.get("score"), n, name, allow_missing=cls.may_miss)
        if "feedback" in out:
            words = list(out["feedback"])
    return score, words


def mean_known(values) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None
