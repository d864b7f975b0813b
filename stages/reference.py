"""reference: the reference model's log-probs over the pool's records, stored as columns.

Adds the reference columns the training objective reads (reference.columns, filled from its
`reference_columns`): reference_logp1 / reference_logp2 / reference_kl_logp (summed over completion
tokens) and reference_token_logps1 (per token); the others stay null. Training reads them, so DPO /
KTO / RL never hold a second model in memory, and re-training with another beta re-uses them: this
stage's fingerprint covers the pool, the reference model and the columns, not the objective's options.
Tokenisation is the trainer's (same max_length and max_prompt_length, filled from train), on the
records' token ids where they carry them.
"""

from __future__ import annotations

import pyarrow as pa

from stages.config import ReferenceConfig
from stages.pipeline.context import StageOutput, stage
from stages.services.models import load_causal_lm, load_tokenizer, model_identity, resolve_model
from stages.data.schemas import REFERENCE_COLUMNS, check_columns
from stages.services.scoring import score
from stages.services.shards import map_shards
from stages.training.precision import cast_for_compute, resolve
from stages.data.tokens import of_record


def identity(cfg: ReferenceConfig) -> dict:
    return {"model": model_identity(cfg.model, "reference.model"), "precision": resolve(cfg.mixed_precision)}


@stage("reference", version="4", inputs=("build_pool",), identity=identity)
def run(ctx, cfg: ReferenceConfig) -> StageOutput:
    pool = ctx.inputs["build_pool"].table()
    check_columns(pool, {"prompt": pa.string(), "generation1": pa.string()}, "reference input (build_pool)")
    rows = pool.to_pylist()
    path = resolve_model(cfg.model, "reference.model")
    ctx.log.info("reference: log-probs of %d records under %s", len(rows), path)
    scored, where = map_shards(reference_shard, rows, cfg.shards, path, cfg, seed=ctx.round_seed)
    columns = {name: [r[name] for r in scored] for name in REFERENCE_COLUMNS.names}
    table = pool.select([c for c in pool.column_names if c not in REFERENCE_COLUMNS.names])
    for field in REFERENCE_COLUMNS:
        table = table.append_column(field, pa.array(columns[field.name], type=field.type))
    filled = {name: sum(v is not None for v in columns[name]) for name in wanted_columns(cfg)}
    return StageOutput(table, {"records": len(rows), "scored": filled, "model": str(path),
                               **({"shards_ran_on": where} if cfg.shards > 1 else {})})


SOURCES = {"reference_logp1": "generation1", "reference_token_logps1": "generation1",
           "reference_logp2": "generation2", "reference_kl_logp": "kl_generation"}  # column -> the completion it scores


def wanted_columns(cfg: ReferenceConfig) -> list[str]:
    """The columns to compute: reference.columns (filled from the objective), or all of them for a
    section built on its own."""
    return list(REFERENCE_COLUMNS.names) if cfg.columns is None else cfg.columns


def reference_shard(rows: list[dict], shard: int, path: str, cfg: ReferenceConfig) -> list[dict]:
    """One shard's reference columns, one dict per record (a Ray task when reference.shards > 1)."""
    tokenizer = load_tokenizer(path)
    # The trainer's arithmetic (train.mixed_precision, filled in): these columns stand in for a
    # resident reference, which computes in the policy's precision.
    model = cast_for_compute(load_causal_lm(path).eval(), resolve(cfg.mixed_precision))
    # Every completion the wanted columns need, of every record, in one list, so the ones of a
    # prompt share its forward pass.
    cols = wanted_columns(cfg)
    wanted = [(gen_col, i) for gen_col in dict.fromkeys(SOURCES[c] for c in cols)
              for i, r in enumerate(rows) if r.get(gen_col) is not None]
    per_token = "reference_token_logps1" in cols
    # The recorded token ids where the pool has them (sampled records), else the tokenised text.
    seqs = [of_record(tokenizer, rows[i], gen_col) for gen_col, i in wanted]
    sums, toks = score(model, seqs, tokenizer.pad_token_id, cfg.batch_size, (cfg.max_prompt_length, cfg.max_length),
                       per_token=per_token, desc="reference")
    out = [{name: None for name in REFERENCE_COLUMNS.names} for _ in rows]
    for (gen_col, i), total, tokens in zip(wanted, sums, toks):
        for col in cols:
            if SOURCES[col] == gen_col:
                out[i][col] = tokens if col == "reference_token_logps1" else total
    return out
