"""A local causal LM writes natural-language feedback and a score (NLF's annotator)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from stages.annotators.llm import FEEDBACK_TEMPLATE, LLMOptions, LocalLLM, parse_score, shown_prompt


class LLMFeedback(LocalLLM):
    """An answer without a readable score is kept with score None, never guessed."""

    kind = "llm_feedback"

    class Options(LLMOptions):
        kind: Literal["llm_feedback"] = "llm_feedback"
        feedback_template: str = FEEDBACK_TEMPLATE  # the critic's request: {prompt} and {completion}
        max_feedback_tokens: int = Field(32, ge=4)  # the feedback is cut here

    @torch.no_grad()
    def __call__(self, prompts, completions, scores=None):
        feedback, out = [], []
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
                out.append(parse_score(text))
        return {"score": out, "feedback": feedback}
