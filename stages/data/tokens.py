"""The token rules every encoder follows (docs/artifacts.md, Conventions).

- A prompt keeps its last `budget` tokens; a shorter prompt is kept whole. A conditioning prefix
  (Quark's control token, NLF's feedback) counts toward the budget and is never cut itself.
- A completion keeps its first `max_length - max_prompt` tokens. Completions from text get EOS
  appended; sampled completions are the policy's own ids, EOS only where the policy stopped.
- Nothing is inserted between prompt and completion: text is tokenised as the data gives it,
  prompt and completion separately, so a completion's tokens never depend on its prompt.
- Rows that carry token ids (everything sampled: `prompt_ids`, `generation1_ids`, ...) are
  scored and trained on those ids, never on a re-tokenisation of their decoded text.
- A classifier judging prompt + completion (a reward model) loses the prompt's start, never the
  completion, to its length limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.pipeline.errors import BadInput


def keep_last(ids: list[int], budget: int) -> list[int]:
    """The last `budget` tokens (all of them when there are fewer; none for a budget <= 0).

    `ids[-budget:]` is wrong twice: budget 0 keeps everything, and it is the idiom that, written
    as `ids[len(ids) - budget:]`, keeps the wrong end of a prompt shorter than the budget.
    """
    return list(ids[max(0, len(ids) - budget):]) if budget > 0 else []


def text_ids(tokenizer, text: str | None) -> list[int]:
    """Token ids of a text as given: no special tokens, nothing stripped or added."""
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


@dataclass(frozen=True)
class Sequence:
    """One (prefix +) prompt + completion, before the length rules: what an encoder receives."""

    prompt: list[int]
    completion: list[int]
    prefix: tuple[int, ...] = ()


def join(seq: Sequence, max_prompt: int, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prefix + prompt + completion under the length rules, and a mask that is 1
    exactly on the completion's tokens."""
    if len(seq.prefix) > max_prompt:
        raise BadInput(f"a conditioning prefix of {len(seq.prefix)} tokens does not fit max_prompt_length "
                       f"{max_prompt}: shorten the feedback or raise train.max_prompt_length")
    prompt = list(seq.prefix) + keep_last(seq.prompt, max_prompt - len(seq.prefix))
    completion = list(seq.completion[:max(0, max_length - max_prompt)])
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def from_text(tokenizer, prompt: str | None, completion: str | None, prefix: tuple[int, ...] = ()) -> Sequence:
    """A text example: prompt and completion tokenised separately, EOS after the completion."""
    return Sequence(text_ids(tokenizer, prompt), text_ids(tokenizer, completion) + [tokenizer.eos_token_id], prefix)


def template_prefix(template: str, **condition: str) -> str:
    """A conditioning text: the template (NLF's feedback, Quark's control) up to its `{prompt}`,
    which ends it (config), filled with the condition."""
    return template[: template.index("{prompt}")].format(**condition)


def ids_column(generation: str) -> str:
    """The record column that holds a generation column's token ids (generation1 -> generation1_ids)."""
    return f"{generation}_ids"


def of_record(tokenizer, row: dict, generation: str, prefix: tuple[int, ...] = ()) -> Sequence:
    """The sequence of `row`'s prompt and its `generation` column: the recorded token ids when the
    row carries them (sampled rows), else the tokenised text."""
    completion_ids = row.get(ids_column(generation))
    if completion_ids is not None and row.get("prompt_ids") is not None:
        return Sequence(list(row["prompt_ids"]), list(completion_ids), prefix)
    return from_text(tokenizer, row.get("prompt"), row.get(generation), prefix)


def for_classifier(tokenizer, texts: list[tuple[str | None, str | None]], max_length: int) -> list[list[int]]:
    """Input ids for a sequence classifier judging each (prompt, completion) as one text, within
    max_length with the tokenizer's special tokens: the prompt's start is cut first; only a
    completion that alone exceeds the limit loses its end."""
    head, tail = special_tokens(tokenizer)
    budget = max_length - len(head) - len(tail)
    out = []
    for prompt, completion in texts:
        c = text_ids(tokenizer, completion)[:budget]
        out.append(head + keep_last(text_ids(tokenizer, prompt), budget - len(c)) + c + tail)
    return out


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one text ([CLS] / [SEP] for BERT, often none
    for causal LMs), read off its own output (transformers 5 has no build_inputs_with_special_tokens)."""
    full = tokenizer("x").input_ids
    plain = tokenizer("x", add_special_tokens=False).input_ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise ValueError(f"cannot locate the special tokens of {type(tokenizer).__name__}")


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)
