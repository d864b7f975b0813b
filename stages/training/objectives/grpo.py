"""Online RL: Group Relative Policy Optimisation (GRPO, Shao et al., 2024), and Dr. GRPO (Liu et
al., 2025) by two switches.

Each of a prompt's n samples gets the advantage of its reward within the prompt's group (minus
the group's mean, over its standard deviation unless `scale_rewards` is off); every token of the
sample carries it in PPO's clipped surrogate on the ratio of the policy to the policy that sampled
it (per-token log-probs recorded by the sample stage, `generation1_logps`), plus beta times the k3
estimate of the KL to the reference per token. `num_iterations` optimizer steps are taken on each
batch before the next, so from the second one on the ratio moves away from 1 and the clip acts.
Batches hold whole prompt groups.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from stages.pipeline.errors import BadInput
from stages.pipeline.sections import Section
from stages.training import losses as L
from stages.training.objectives.base import Objective, batch_token_logps, column, token_grid


class GRPO(Objective):
    name = "grpo"
    needs = ("prompt", "generation1", "generation1_reward")
    reference_columns = ("reference_token_logps1",)
    group_by = "prompt_id"

    class Options(Section):
        beta: float = Field(0.04, ge=0)  # k3 KL to the reference per token; 0: no reference at all
        epsilon: float = Field(0.2, gt=0, lt=1)  # ratio clipped to [1 - epsilon, 1 + epsilon_high]
        epsilon_high: float | None = Field(None, gt=0)  # DAPO's clip-higher; None: epsilon
        scale_rewards: bool = True  # divide by the group's std; off (with loss_type dr_grpo) = Dr. GRPO
        # grpo: each sequence's token mean, then the mean over sequences; dr_grpo: token sums over a
        # constant, max_completion_length (no length bias).
        loss_type: Literal["grpo", "dr_grpo"] = "grpo"
        max_completion_length: int = Field(0, ge=0)  # dr_grpo's constant: the sampler's max_new_tokens
        num_iterations: int = Field(1, ge=1)  # optimizer steps on each batch of samples

        @model_validator(mode="after")
        def _dr_grpo_needs_its_constant(self):
            if self.loss_type == "dr_grpo" and not self.max_completion_length:
                raise ValueError("max_completion_length: loss_type dr_grpo divides each sequence's token sum by "
                                 "the generation budget; set it to sample.max_new_tokens")
            return self

    def uses_reference(self):
        return self.opt.beta > 0

    def updates_per_batch(self):
        return self.opt.num_iterations

    def collate(self, rows, tokenizer):
        out = self.seqs(tokenizer, rows, ["generation1"], share_prompt=True)
        ids = {pid: i for i, pid in enumerate(dict.fromkeys(r["prompt_id"] for r in rows))}
        out["groups"] = torch.tensor([ids[r["prompt_id"]] for r in rows])
        out["rewards"] = column(rows, "generation1_reward", torch.float64)
        out["weights"] = column(rows, "generation1_weight", default=1.0)
        old = token_grid(out, rows, "generation1_logps")
        if old is not None:
            out["old_token_logps"] = old
        elif self.opt.num_iterations > 1:
            raise BadInput("train.grpo.num_iterations > 1 needs the sampling policy's per-token log-probs "
                           "(records column 'generation1_logps', which the sample stage records); these records "
                           "have none")
        ref = token_grid(out, rows, "reference_token_logps1") if self.opt.beta > 0 else None
        if ref is not None:
            out["ref_token_logps"] = ref
        return out

    def per_example_loss(self, model, batch):
        ref = None
        if self.opt.beta > 0:  # first, as in DPO: under LoRA the reference is the policy with adapters off
            ref = batch.get("ref_token_logps")
            if ref is None:
                if self.ref_model is None:
                    raise RuntimeError("grpo needs reference log-probs: no cached 'reference_token_logps1' and no "
                                       "reference model")
                with torch.no_grad():
                    ref = batch_token_logps(self.ref_model, batch)[0]
        logp, mask = batch_token_logps(model, batch)
        # Without recorded log-probs (offline records, num_iterations 1) the batch is taken as on-policy.
        old = batch.get("old_token_logps", logp.detach()).to(logp.dtype)
        adv = L.group_advantages(batch["rewards"], batch["groups"], self.opt.scale_rewards).to(logp.dtype)
        eps_high = self.opt.epsilon_high if self.opt.epsilon_high is not None else self.opt.epsilon
        parts = L.grpo_token_loss(logp, old, None if ref is None else ref.to(logp.dtype), adv, mask,
                                  self.opt.epsilon, eps_high, self.opt.beta)
        n = mask.sum(-1)
        per_seq = parts["loss"].sum(-1)
        loss = per_seq / n.clamp(min=1) if self.opt.loss_type == "grpo" else per_seq / self.opt.max_completion_length
        mean = lambda x: x.sum(-1).detach() / n.clamp(min=1)  # noqa: E731
        return loss, {"advantage": adv, "reward": batch["rewards"].to(logp.dtype), "kl": mean(parts["kl"]),
                      "clip_fraction": mean(parts["clipped"]), "ratio": mean(parts["ratio"]), "tokens": n}
