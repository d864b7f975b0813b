"""A sequence classifier with one output (ours, or any HF reward model) scores prompt + completion."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from stages.annotators.base import Annotator
from stages.services.models import load_sequence_classifier, load_tokenizer, model_identity, resolve_model
from stages.pipeline.paths import default_artifact_root
from stages.pipeline.refs import ArtifactRef, locate
from stages.pipeline.sections import Section
from stages.pipeline.store import ArtifactStore
from stages.data.tokens import for_classifier, pad

# The model the reward_movies flow trains, under the run's artifact root (stages/pipeline/refs.py).
DEFAULT_REWARD_MODEL = ArtifactRef(experiment="reward_movies", stage="train", file="model")


def reward_model_path(ref: str | ArtifactRef) -> str:
    """A model path; a reference the runner has not resolved (a caller outside a run) is looked up
    under the default artifact root."""
    if isinstance(ref, ArtifactRef):
        return locate(ref, ArtifactStore(default_artifact_root()), "annotate.steps[].model")
    return resolve_model(ref, "annotate.model")


class RewardModel(Annotator):
    """Batched scores: P(preferred) as the sigmoid of a one-output (Bradley-Terry) head, or P(class 1)
    of a two-class head."""

    kind = "reward_model"

    class Options(Section):
        kind: Literal["reward_model"] = "reward_model"
        model: str | ArtifactRef = DEFAULT_REWARD_MODEL  # default: the reward_movies flow's model
        batch_size: int = Field(32, ge=1)  # texts per forward pass
        # tokens of prompt + completion; a longer one loses the prompt's start first, never the completion
        max_length: int = Field(128, ge=8)

    @classmethod
    def identity(cls, step):
        return model_identity(reward_model_path(step.model), "annotate.model")

    def __init__(self, step):
        super().__init__(step)
        path = reward_model_path(step.model)
        self.tokenizer = load_tokenizer(path)
        self.model = load_sequence_classifier(path, self.tokenizer).eval()

    @torch.no_grad()
    def __call__(self, prompts, completions, scores=None):
        # prompt + completion as one text, joined as given
        ids = for_classifier(self.tokenizer, list(zip(prompts, completions)), self.step.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [0.0] * len(ids)
        for k in range(0, len(order), self.step.batch_size):
            idx = order[k:k + self.step.batch_size]
            batch = [ids[i] for i in idx]
            logits = self.model(input_ids=pad(batch, self.tokenizer.pad_token_id),
                                attention_mask=pad([[1] * len(x) for x in batch], 0)).logits.float()
            probs = torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else logits.softmax(-1)[:, 1]
            for i, s in zip(idx, probs.tolist()):
                out[i] = s
        return {"score": out}
