"""Annotators: one small interface, `annotate(prompts, completions) -> columns`.

Each returns a dict of equal-length lists: "score" (a float, or None when it could not be read,
never guessed) and optionally "feedback" (text). The annotate stage checks what comes back.
"""

from __future__ import annotations

import importlib
import math
import re


import torch

from stages.errors import BadInput
from stages.models import load_causal_lm, load_sequence_classifier, load_tokenizer, resolve_model
from stages.paths import PROJECT_ROOT
from stages.tokens import for_classifier, keep_last, pad, text_ids

DEFAULT_REWARD_MODEL = "artifacts/reward_movies/round-0/train/model"


def vader_compound(prompts: list[str], completions: list[str]) -> list[float]:
    """The rule-based sentiment reward: vaderSentiment's compound score of the continuation, in [-1, 1]."""
    from stages.data import vader_sentiment

    return vader_sentiment(list(completions))


def load_callable(dotted: str, field: str):
    module, _, name = dotted.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise BadInput(f"{field}: cannot import '{dotted}' ({type(e).__name__})") from None
    if not callable(fn):
        raise BadInput(f"{field}: '{dotted}' is not callable")
    return fn


def reward_model_path(ref: str | None) -> str:
    if ref is None:
        path = PROJECT_ROOT / DEFAULT_REWARD_MODEL
        if not (path / "config.json").exists():
            raise BadInput(f"annotate: no reward model at {path}: run `align run configs/reward_movies.yaml` first, "
                           "or set annotate.steps[].model")
        return str(path)
    return resolve_model(ref, "annotate.model")


class RewardModel:
    """A sequence classifier with one output (ours, or any HF reward model): batched scores."""

    def __init__(self, step):
        path = reward_model_path(step.model)
        self.tokenizer = load_tokenizer(path)
        self.model = load_sequence_classifier(path, self.tokenizer).eval()
        self.step = step

    @torch.no_grad()
    def __call__(self, prompts, completions):
        # prompt + completion as one text, joined as given; too long, it loses the prompt's start
        ids = for_classifier(self.tokenizer, list(zip(prompts, completions)), self.step.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = [0.0] * len(ids)
        for k in range(0, len(order), self.step.batch_size):
            idx = order[k:k + self.step.batch_size]
            batch = [ids[i] for i in idx]
            logits = self.model(input_ids=pad(batch, self.tokenizer.pad_token_id),
                                attention_mask=pad([[1] * len(x) for x in batch], 0)).logits.float()
            # one output: P(preferred) as a sigmoid of the Bradley-Terry score; two: P(class 1)
            probs = torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else logits.softmax(-1)[:, 1]
            for i, s in zip(idx, probs.tolist()):
                scores[i] = s
        return {"score": scores}


def shown_prompt(tokenizer, prompt: str, max_tokens: int) -> str:
    """The task prompt as an LLM annotator is shown it: its last max_tokens tokens (the
    continuations it judges are shown whole)."""
    ids = text_ids(tokenizer, prompt)
    return prompt if len(ids) <= max_tokens else tokenizer.decode(keep_last(ids, max_tokens))


class Rule:
    def __init__(self, step):
        self.fn = load_callable(step.callable, "annotate.callable")

    def __call__(self, prompts, completions):
        return {"score": self.fn(list(prompts), list(completions))}


class LLMJudge:
    """A causal LM asked which of two samples of a prompt is better, in both orders to cancel
    position bias. The preference comes from the answer tokens' log-probs, not from free text:
    P(i beats j) = mean(P("A" | i first), P("B" | i second)), each normalised over {A, B}.
    With n samples per prompt a sample's score is its mean win probability against the others."""

    def __init__(self, step):
        path = resolve_model(step.model or "smollm2", "annotate.model")
        self.tokenizer = load_tokenizer(path, padding_side="left")
        self.model = load_causal_lm(path).eval()
        self.step = step
        self.answer_ids = [self.tokenizer.convert_tokens_to_ids(a) for a in ("A", "B")]

    def render(self, prompt, a, b) -> str:
        text = self.step.judge_template.format(prompt=shown_prompt(self.tokenizer, prompt, self.step.max_length),
                                               a=a, b=b)
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text + "\nAnswer:"

    @torch.no_grad()
    def p_first(self, items: list[tuple[str, str, str]]) -> list[float]:
        """P(answer A) normalised over {A, B} for each (prompt, a, b)."""
        out = []
        for k in range(0, len(items), self.step.batch_size):
            texts = [self.render(*it) for it in items[k:k + self.step.batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            pos = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(**enc, position_ids=pos).logits[:, -1].float()
            two = logits[:, self.answer_ids].log_softmax(-1)
            out.extend(two[:, 0].exp().tolist())
        return out

    @staticmethod
    def combine(p_a_first: float, p_a_second: float) -> float:
        """P(a beats b) from P("A") with a shown first and P("A") with b shown first."""
        return (p_a_first + (1 - p_a_second)) / 2

    def __call__(self, prompts, completions):
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        items, pairs = [], []
        for p, idx in groups.items():
            for x in idx:
                for y in idx:
                    if x != y:
                        items.append((p, completions[x], completions[y]))
                        pairs.append((x, y))
        firsts = self.p_first(items)
        p_first = dict(zip(pairs, firsts))
        wins: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
        for (x, y), pf in p_first.items():
            if x < y:
                pref = self.combine(pf, p_first[(y, x)])
                wins[x].append(pref)
                wins[y].append(1 - pref)
        # a prompt with a single sample has nothing to be compared with: no score
        return {"score": [sum(w) / len(w) if w else None for i, w in sorted(wins.items())]}


SCORE_PATTERN = re.compile(r"score\s*[:=]?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.IGNORECASE)


def parse_score(text: str) -> float | None:
    """'Score: 7/10 ...' -> 0.7; None when the answer holds no readable score in [0, 10]."""
    m = SCORE_PATTERN.search(text)
    if not m:
        return None
    value = float(m.group(1))
    return value / 10 if 0 <= value <= 10 else None


class LLMFeedback:
    """A causal LM writes natural-language feedback and a score (NLF's annotator). An answer
    without a readable score is kept with score None, never guessed."""

    def __init__(self, step):
        path = resolve_model(step.model or "smollm2", "annotate.model")
        self.tokenizer = load_tokenizer(path, padding_side="left")
        self.model = load_causal_lm(path).eval()
        self.step = step

    @torch.no_grad()
    def __call__(self, prompts, completions):
        feedback, scores = [], []
        for k in range(0, len(prompts), self.step.batch_size):
            texts = []
            for p, c in zip(prompts[k:k + self.step.batch_size], completions[k:k + self.step.batch_size]):
                msg = self.step.feedback_template.format(prompt=shown_prompt(self.tokenizer, p, self.step.max_length),
                                                         completion=c)
                texts.append(self.tokenizer.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                                                add_generation_prompt=True)
                             if self.tokenizer.chat_template else msg)
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = self.model.generate(**enc, do_sample=False, max_new_tokens=self.step.max_feedback_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
            for row in gen[:, enc.input_ids.shape[1]:]:
                text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
                feedback.append(text)
                scores.append(parse_score(text))
        return {"score": scores, "feedback": feedback}


class TemplateFeedback:
    """Feedback phrases from score buckets ("Excellent.", "Good.", ...): NLF without an LLM."""

    def __init__(self, step):
        self.buckets = sorted(step.buckets, key=lambda b: -b[0])

    def feedback_for(self, score):
        if score is None or (isinstance(score, float) and math.isnan(score)):
            return None
        return next((phrase for t, phrase in self.buckets if score >= t), self.buckets[-1][1])


ANNOTATORS = {"reward_model": RewardModel, "rule": Rule, "llm_judge": LLMJudge, "llm_feedback": LLMFeedback}


