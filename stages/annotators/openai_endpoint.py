"""An LLM behind any OpenAI-compatible endpoint (OpenAI, vLLM, `transformers serve`, ...) as a judge
or a feedback writer: how the NLF project and HALOs label with GPT models.

The endpoint's URL and model come from the config; the API key only from the environment variable
the config names (never from the config itself). The answer parsing and the missing-value rules are
the local LLM annotators': a judge's preference is read from the answer tokens' log-probs where the
endpoint returns them, else from the answer's text; an answer that holds no choice or no score is
recorded as missing, never guessed.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from pydantic import Field

from stages.annotators.base import Annotator
from stages.annotators.llm import FEEDBACK_TEMPLATE, JUDGE_TEMPLATE, pairwise_scores, parse_choice, parse_score
from stages.pipeline.sections import Section


class OpenAIEndpoint(Annotator):
    kind = "openai"
    may_miss = True

    class Options(Section):
        kind: Literal["openai"] = "openai"
        base_url: str  # e.g. http://127.0.0.1:8000/v1
        model: str  # the model's name at the endpoint
        mode: Literal["judge", "feedback"] = "judge"  # pairwise A/B preference, or NLF feedback text
        api_key_env: str = "OPENAI_API_KEY"  # the variable that holds the key; unset = no key (local servers)
        judge_template: str = JUDGE_TEMPLATE  # mode judge: as llm_judge's
        feedback_template: str = FEEDBACK_TEMPLATE  # mode feedback: as llm_feedback's
        max_tokens: int = Field(32, ge=1)  # feedback mode; a judge asks for 4 (its first token decides)
        max_prompt_chars: int = Field(2000, ge=1)  # the task prompt shown keeps its last characters
        concurrency: int = Field(4, ge=1)  # requests in flight
        timeout: float = Field(60.0, gt=0)  # seconds per request
        max_retries: int = Field(2, ge=0)  # the client's own retries of transient failures, with back-off

    def __init__(self, step):
        super().__init__(step)
        from openai import OpenAI

        self.client = OpenAI(base_url=step.base_url, api_key=os.environ.get(step.api_key_env) or "none",
                             timeout=step.timeout, max_retries=step.max_retries)

    def shown(self, prompt: str) -> str:
        return prompt[-self.step.max_prompt_chars:]

    def ask(self, text: str, max_tokens: int, logprobs: bool):
        return self.client.chat.completions.create(
            model=self.step.model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
            temperature=0.0, **({"logprobs": True, "top_logprobs": 5} if logprobs else {})).choices[0]

    def p_a(self, item: tuple[str, str, str]) -> float | None:
        """P("A") for one (prompt, a, b): from the first answer token's log-probs when returned."""
        prompt, a, b = item
        choice = self.ask(self.step.judge_template.format(prompt=self.shown(prompt), a=a, b=b), 4, logprobs=True)
        content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
        if content:
            probs = {"A": 0.0, "B": 0.0}
            for top in content[0].top_logprobs or []:
                token = top.token.strip().upper()
                if token in probs:
                    probs[token] += math.exp(top.logprob)
            if probs["A"] + probs["B"] > 0:
                return probs["A"] / (probs["A"] + probs["B"])
        return parse_choice(choice.message.content or "")

    def feedback(self, pc: tuple[str, str]) -> str:
        prompt, completion = pc
        text = self.step.feedback_template.format(prompt=self.shown(prompt), completion=completion)
        return (self.ask(text, self.step.max_tokens, logprobs=False).message.content or "").strip()

    def __call__(self, prompts, completions, scores=None):
        with ThreadPoolExecutor(self.step.concurrency) as pool:
            if self.step.mode == "judge":
                return {"score": pairwise_scores(prompts, completions, lambda items: list(pool.map(self.p_a, items)))}
            feedback = list(pool.map(self.feedback, zip(prompts, completions)))
        return {"score": [parse_score(f) for f in feedback], "feedback": feedback}
