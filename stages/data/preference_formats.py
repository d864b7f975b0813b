"""Rows of the common hub preference datasets -> our pairwise fields: prompt, chosen, rejected.

Pure functions, no I/O: the caller reads a Parquet/JSONL file (or a hub dataset) into a
`pyarrow.Table` and calls `to_pairs(table, fmt)`. Every result is a dict
`{"prompt": str, "chosen": str, "rejected": str}`, one per kept row, in table order.

Formats (`FORMATS`):

- "hh_rlhf"          Anthropic/hh-rlhf: `chosen`, `rejected` are whole transcripts.
- "ultrafeedback"    trl-lib/ultrafeedback_binarized, HuggingFaceH4/ultrafeedback_binarized:
                     `chosen`, `rejected` are lists of {"role", "content"} messages.
- "tldr_preference"  trl-lib/tldr-preference: `prompt`, `chosen`, `rejected` strings
                     (the conversational "trl-style" variant is accepted too).
- "pairs"            any table that already has string columns `prompt`, `chosen`, `rejected`.

Rules shared by all formats:

- A row whose chosen or rejected answer is missing (null) or empty after stripping whitespace
  is dropped, silently. Nothing else is dropped.
- Answers are kept verbatim (no trimming): prompt + answer is the data's own text, so hh_rlhf's
  answers keep the space that follows the "Assistant:" marker. Trainers join prompt and answer
  as given and invent no separator (stages/data/tokens.py).
- User errors raise `BadInput` with one line that starts with `source` and names the column,
  the format or the row (0-based index in the table).

Conversational rows (ultrafeedback, conversational tldr_preference) are rendered like this:

- The answer is the `content` of the last message of `chosen` / `rejected`, whose role must be
  "assistant". The prompt messages are all messages before it; they must be the same in
  `chosen` and `rejected`. Where there are none (TRL's "explicit prompt" layout, chosen =
  [assistant message]), the `prompt` column gives them: a string becomes one user message, a
  list of messages is used as it is.
- Without a tokenizer, each prompt message becomes one line "<Role>: <content>" (Role is the
  role with its first letter upper-cased: "User", "Assistant", "System"), lines are joined with
  "\\n", and "\\nAssistant:" is appended. [user "Hi", assistant "Hello!", user "Name a fruit."]
  renders as "User: Hi\\nAssistant: Hello!\\nUser: Name a fruit.\\nAssistant:". The answers then
  get a leading space where they have none, so prompt + answer reads "...Assistant: answer".
- With `tokenizer=...`, the prompt is
  `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` and the
  answers are the messages' contents as they are. hh_rlhf transcripts are conversations too: with a
  tokenizer their turns become user/assistant messages, each stripped, and the answers are stripped.
  The tokenizer is used for conversational rows only; string formats ignore it.
"""

from __future__ import annotations

import os
import re

import pyarrow as pa

from stages.pipeline.errors import BadInput

FORMATS = ("hh_rlhf", "ultrafeedback", "tldr_preference", "pairs")

HH_MARKER = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


def to_pairs(table: pa.Table, fmt: str, source: str = "data", *, tokenizer=None) -> list[dict]:
    """Convert `table` in the hub schema `fmt` to [{"prompt", "chosen", "rejected"}, ...].

    Rows with an empty or null chosen/rejected answer are dropped (see the module docstring).
    Raises BadInput for an unknown format, a missing column, a column of the wrong kind, or a
    row that cannot be split into prompt and answers.
    """
    if fmt not in _CONVERTERS:
        raise BadInput(f"{source}: unknown preference format '{fmt}' (known formats: {', '.join(FORMATS)})")
    required, convert = _CONVERTERS[fmt]
    for col in required:
        if col not in table.column_names:
            raise BadInput(f"{source}: format '{fmt}' needs column '{col}'")
    return convert(table, fmt, source, tokenizer)


# --- hh_rlhf -------------------------------------------------------------------------------------

def _hh_rlhf(table: pa.Table, fmt: str, source: str, tokenizer) -> list[dict]:
    """Anthropic/hh-rlhf: columns `chosen`, `rejected` (strings), each a whole transcript
    "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <final answer>".

    prompt = the longest common prefix of the two transcripts, cut just after the last
    "\\n\\nAssistant:" inside it (leading "\\n\\n" kept, exactly as in the data);
    chosen / rejected = the rest of each transcript, its leading space kept (prompt + answer is
    the transcript).
    BadInput (naming the row) when the transcripts share no prefix ending in "\\n\\nAssistant:",
    or when they diverge before the last assistant turn (an answer would still hold a
    "\\n\\nHuman:" or "\\n\\nAssistant:" turn).
    """
    for col in ("chosen", "rejected"):
        _need_strings(table, col, fmt, source)
    out = []
    for i, (chosen, rejected) in enumerate(zip(table.column("chosen").to_pylist(),
                                               table.column("rejected").to_pylist())):
        if _empty(chosen) or _empty(rejected):
            continue
        common = len(os.path.commonprefix([chosen, rejected]))
        cut = chosen.rfind(HH_MARKER, 0, common)  # the last marker wholly inside the shared prefix
        if cut < 0:
            raise BadInput(f"{source}: row {i}: 'chosen' and 'rejected' share no prefix ending with "
                           f"'\\n\\nAssistant:' (format '{fmt}')")
        end = cut + len(HH_MARKER)
        answers = [chosen[end:], rejected[end:]]
        for name, text in zip(("chosen", "rejected"), answers):
            if HH_MARKER in text or HH_HUMAN in text:
                raise BadInput(f"{source}: row {i}: 'chosen' and 'rejected' diverge before the last "
                               f"'\\n\\nAssistant:' turn ('{name}' goes on for more turns; format '{fmt}')")
        if _empty(answers[0]) or _empty(answers[1]):
            continue
        if tokenizer is None:
            out.append({"prompt": chosen[:end], "chosen": answers[0], "rejected": answers[1]})
        else:
            messages = _hh_turns(chosen[:end], i, fmt, source)
            out.append({"prompt": render_prompt(messages, tokenizer, where=f"{source}: row {i}"),
                        "chosen": answers[0].strip(), "rejected": answers[1].strip()})
    return out


def _hh_turns(prompt: str, i: int, fmt: str, source: str) -> list[dict]:
    """An hh-rlhf prompt ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:") as messages, each
    turn's text stripped (as TRL's hh-rlhf conversion does), the final empty assistant turn left out."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    if parts[0].strip():
        raise BadInput(f"{source}: row {i}: the transcript does not start with '\\n\\nHuman:' (format '{fmt}')")
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    return turns[:-1]  # the prompt ends with the answer's empty assistant turn


# --- ultrafeedback / tldr_preference / pairs -----------------------------------------------------

def _ultrafeedback(table: pa.Table, fmt: str, source: str, tokenizer) -> list[dict]:
    """trl-lib/ultrafeedback_binarized: `chosen`, `rejected` = list<struct<content: string,
    role: string>>, each [user message, assistant answer]; no `prompt` column (plus
    `score_chosen`, `score_rejected`, ignored). HuggingFaceH4/ultrafeedback_binarized
    (train_prefs/test_prefs): the same plus `prompt` (string) and `prompt_id`, `messages`, ignored.

    The prompt comes from the messages before the final assistant answer (the `prompt` column is
    used only when there are none); see the module docstring for the rendering. A table whose
    `chosen`/`rejected` are plain strings is read like "pairs" (then `prompt` is required).
    """
    return _preference(table, fmt, source, tokenizer)


def _tldr_preference(table: pa.Table, fmt: str, source: str, tokenizer) -> list[dict]:
    """trl-lib/tldr-preference: `prompt` (string: "SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST:
    ...\\n\\nTL;DR:"), `chosen`, `rejected` (strings: the summaries), taken verbatim.
    The conversational variant (trl-internal-testing/tldr-preference-trl-style: `prompt` string,
    `chosen`/`rejected` = [user prompt, assistant summary] messages, plus `info`, `summaries`,
    `choice`, ... ignored) is read like "ultrafeedback".
    """
    return _preference(table, fmt, source, tokenizer)


def _pairs(table: pa.Table, fmt: str, source: str, tokenizer) -> list[dict]:
    """Generic: string columns `prompt`, `chosen`, `rejected`, taken verbatim (a null prompt is "")."""
    for col in ("prompt", "chosen", "rejected"):
        _need_strings(table, col, fmt, source)
    return _standard_rows(table)


def _preference(table: pa.Table, fmt: str, source: str, tokenizer) -> list[dict]:
    kinds = {col: _kind(table, col, fmt, source) for col in ("chosen", "rejected")}
    if kinds["chosen"] != kinds["rejected"]:
        raise BadInput(f"{source}: format '{fmt}': columns 'chosen' and 'rejected' must both hold strings "
                       f"or both hold lists of messages (they hold {table.schema.field('chosen').type} "
                       f"and {table.schema.field('rejected').type})")
    if kinds["chosen"] == "string":
        if "prompt" not in table.column_names:
            raise BadInput(f"{source}: format '{fmt}' needs column 'prompt'")
        _need_strings(table, "prompt", fmt, source)
        return _standard_rows(table)
    prompts = table.column("prompt").to_pylist() if "prompt" in table.column_names else [None] * table.num_rows
    if "prompt" in table.column_names:
        _kind(table, "prompt", fmt, source)
    out = []
    for i, (chosen, rejected, prompt) in enumerate(zip(table.column("chosen").to_pylist(),
                                                       table.column("rejected").to_pylist(), prompts)):
        c_context, c_answer = _split_conversation(chosen, "chosen", i, fmt, source)
        r_context, r_answer = _split_conversation(rejected, "rejected", i, fmt, source)
        if _empty(c_answer) or _empty(r_answer):
            continue
        if c_context != r_context:
            raise BadInput(f"{source}: row {i}: 'chosen' and 'rejected' differ before the final assistant "
                           f"message (format '{fmt}')")
        messages = c_context or _prompt_messages(prompt, i, fmt, source)
        if tokenizer is None:  # "...\nAssistant:" + " answer": the space on the answer's side, as in hh-rlhf
            c_answer, r_answer = (a if a[:1].isspace() else " " + a for a in (c_answer, r_answer))
        out.append({"prompt": render_prompt(messages, tokenizer, where=f"{source}: row {i}"),
                    "chosen": c_answer, "rejected": r_answer})
    return out


def _standard_rows(table: pa.Table) -> list[dict]:
    out = []
    for prompt, chosen, rejected in zip(table.column("prompt").to_pylist(), table.column("chosen").to_pylist(),
                                        table.column("rejected").to_pylist()):
        if _empty(chosen) or _empty(rejected):
            continue
        out.append({"prompt": prompt or "", "chosen": chosen, "rejected": rejected})
    return out


def _split_conversation(messages, col: str, i: int, fmt: str, source: str) -> tuple[list[dict], str | None]:
    """(messages before the final assistant message, its content); (…, None) for a null/empty list."""
    if not messages:
        return [], None
    clean = [_message(m, col, i, fmt, source) for m in messages]
    if clean[-1]["role"] != "assistant":
        raise BadInput(f"{source}: row {i}: '{col}' must end with an assistant message, it ends with role "
                       f"'{clean[-1]['role']}' (format '{fmt}')")
    return clean[:-1], clean[-1]["content"]


def _message(m, col: str, i: int, fmt: str, source: str) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise BadInput(f"{source}: row {i}: '{col}' holds a message without a 'role' (format '{fmt}')")
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        raise BadInput(f"{source}: row {i}: '{col}' holds a message whose 'content' is not a string "
                       f"(format '{fmt}')")
    return {"role": m["role"], "content": content or ""}


def _prompt_messages(prompt, i: int, fmt: str, source: str) -> list[dict]:
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return [_message(m, "prompt", i, fmt, source) for m in prompt]
    raise BadInput(f"{source}: row {i}: no prompt: 'chosen' holds only the answer and column 'prompt' is "
                   f"missing or empty (format '{fmt}')")


def render_prompt(messages: list[dict], tokenizer=None, where: str = "data") -> str:
    """Prompt messages as text: the tokenizer's chat template with the generation prompt, or
    "<Role>: <content>" lines joined by "\\n" followed by "\\nAssistant:" (see module docstring)."""
    if tokenizer is not None:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that rejects these roles/turns: the data does not fit the model
            raise BadInput(f"{where}: the tokenizer's chat template failed on these messages: {e}") from e
    lines = [f"{m['role'][:1].upper()}{m['role'][1:]}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


# --- column checks -------------------------------------------------------------------------------

def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_messages(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_struct(t.value_type) or pa.types.is_null(t.value_type))


def _kind(table: pa.Table, col: str, fmt: str, source: str) -> str:
    t = table.schema.field(col).type
    if _is_string(t):
        return "string"
    if _is_messages(t):
        return "messages"
    raise BadInput(f"{source}: format '{fmt}': column '{col}' must hold strings or lists of "
                   f"{{role, content}} messages, it holds {t}")


def _need_strings(table: pa.Table, col: str, fmt: str, source: str) -> None:
    t = table.schema.field(col).type
    if not _is_string(t):
        raise BadInput(f"{source}: format '{fmt}': column '{col}' must hold strings, it holds {t}")


def _empty(text) -> bool:
    return not isinstance(text, str) or not text.strip()


_CONVERTERS = {
    "hh_rlhf": (("chosen", "rejected"), _hh_rlhf),
    "ultrafeedback": (("chosen", "rejected"), _ultrafeedback),
    "tldr_preference": (("prompt", "chosen", "rejected"), _tldr_preference),
    "pairs": (("prompt", "chosen", "rejected"), _pairs),
}
