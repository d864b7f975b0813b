"""A local causal LM asked which of two samples of a prompt is better, in both orders."""

from __future__ import annotations

from typing import Literal

import torch

from stages.annotators.llm import JUDGE_TEMPLATE, LLMOptions, LocalLLM, pairwise_scores, shown_prompt


class LLMJudge(LocalLLM):
    """The preference comes from the answer tokens' log-probs, not from free text:
    P(i beats j) = mean(P("A" | i first), P("B" | i second)), each normalised over {A, B}.
    With n samples per prompt a sample's score is its mean win probability against the others."""

    kind = "llm_judge"

    class Options(LLMOptions):
        kind: Literal["llm_judge"] = "llm_judge"
        judge_template: str = JUDGE_TEMPLATE  # the question: {prompt}, {a} and {b}; the judge answers A or B

    def __init__(self, step):
        super().__init__(step)
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
            # Left padding: every row's answer is read at the last position, the only logits computed.
            logits = self.model(**enc, position_ids=pos, logits_to_keep=1).logits[:, -1].float()
            two = logits[:, self.answer_ids].log_softmax(-1)
            out.extend(two[:, 0].exp().tolist())
        return out

    def __call__(self, prompts, completions, scores=None):
        return {"score": pairwise_scores(prompts, completions, self.p_first)}
