"""sample: n generations per prompt from the current policy (stages/services/generation.py).

Round 0 samples from `sample.model` (the base policy); round k from round k-1's trained model.
Each row records the prompt and completion token ids, the policy's own log-prob of each generated
token and their sum, whether it was truncated, and the checkpoint that produced it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from stages.config import SampleConfig
from stages.pipeline.context import StageOutput, stage
from stages.pipeline.errors import BadInput
from stages.pipeline.store import ArtifactStore
from stages.services.generation import conditioning, generate
from stages.services.models import model_identity, resolve_model
from stages.services.shards import map_shards, shard_seed

SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("prompt", pa.string()), ("split", pa.string()), ("sample_index", pa.int32()),
    ("completion", pa.string()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
    ("truncated", pa.bool_()), ("policy_logprob", pa.float64()), ("conditioning", pa.string()),
    ("checkpoint", pa.string()),
    # The exact tokens the policy saw and drew: conditioning_ids + prompt_ids, then completion_ids
    # (EOS last where the policy stopped). Every later stage scores and trains these ids, never a
    # re-tokenisation of the text. prompt_ids is the unconditioned prompt, as cut for the budget.
    ("conditioning_ids", pa.list_(pa.int32())), ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
    # log p(token) of each completion_ids token under the sampling policy (GRPO's pi_old)
    ("completion_logps", pa.list_(pa.float32())),
])


def identity(cfg: SampleConfig) -> dict:
    return {"model": model_identity(cfg.model, "sample.model")}


@stage("sample", version="7", inputs=("load_prompts@0", "train@prev"), identity=identity)
def run(ctx, cfg: SampleConfig) -> StageOutput:
    prompts = [r for r in ctx.inputs["load_prompts"].table().to_pylist() if cfg.split in ("all", r["split"])]
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
    if not prompts:
        raise BadInput(f"sample: no prompts in split '{cfg.split}'")
    path = ctx.inputs["train"].model_dir() if "train" in ctx.inputs else resolve_model(cfg.model, "sample.model")
    ctx.log.info("sample: %d prompts x %d from %s (%s backend)", len(prompts), cfg.n, path, cfg.backend)
    if ctx.round < cfg.conditioning_from_round:
        cfg = cfg.model_copy(update={"conditioning": "none"})
    # A shard on another machine fetches last round's policy from a remote store itself.
    train = ctx.inputs.get("train")
    remote = (train.store.url, train.path) if train is not None and not train.store.local else None
    generated, where = map_shards(sample_shard, [r["prompt"] for r in prompts], cfg.shards, str(path), remote, cfg,
                                  ctx.round_seed, seed=ctx.round_seed)
    cond = conditioning(cfg)[1]
    # Where the policy lives, not this machine's cached copy of it (on object-store roots).
    checkpoint = train.store.fs.unstrip_protocol(f"{train.path}/model") if remote else str(path)
    rows = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "split": r["split"], "sample_index": i,
             "conditioning": cond, "checkpoint": checkpoint, **g}
            for r, gens in zip(prompts, generated) for i, g in enumerate(gens)]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    truncated = sum(r["truncated"] for r in rows) / len(rows)
    mean_len = sum(r["completion_tokens"] for r in rows) / len(rows)
    return StageOutput(table, {"samples": len(rows), "prompts": len(prompts), "truncated_fraction": truncated,
                               "mean_completion_tokens": mean_len, **({"shards_ran_on": where} if cfg.shards > 1 else {})})


def sample_shard(texts: list[str], shard: int, path: str, remote: tuple[str, str] | None, cfg: SampleConfig,
                 seed: int) -> list[list[dict]]:
    """One shard's generations (a Ray task when sample.shards > 1); `remote`: (store URL, train
    artifact) to read the policy from when the artifacts live in object storage."""
    if remote is not None and not Path(path).is_dir():
        path = str(ArtifactStore(remote[0]).local_dir(remote[1]) / "model")
    return generate(path, texts, cfg, shard_seed(seed, shard), logging.getLogger("align"))
