"""reference: the reference model's log-probs over the pool's records, stored as columns.

Adds reference_logp1 / reference_logp2 / reference_kl_logp (summed over completion tokens) and,
when asked, reference_token_logps1 (per token) to the pool's table. Training reads them, so
DPO / KTO / RL never hold a second model in memory, and re-training with another beta re-uses
them: this stage's fingerprint covers the pool and the reference model, not the objective.
Tokenisation is the trainer's (same max_length and max_prompt_length, filled from train).
"""

from __future__ import annotations

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from stages.config import ReferenceConfig
from stages.logprobs import completion_token_logps
from stages.models import load_causal_lm, load_tokenizer, model_identity, resolve_model
from stages.objectives import sequences
from stages.schemas import REFERENCE_COLUMNS, check_columns

NAME = "reference"
VERSION = "1"
INPUTS = ("build_pool",)


def identity(cfg: ReferenceConfig) -> dict:
    return {"model": model_identity(cfg.model, "reference.model")}


@torch.no_grad()
def score(model, tokenizer, pairs: list[tuple[str, str]], cfg: ReferenceConfig, per_token: bool, desc: str):
    """Summed (and optionally per-token) completion log-probs, in the order of `pairs`."""
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))  # little padding
    sums: list[float] = [0.0] * len(pairs)
    tokens: list[list[float] | None] = [None] * len(pairs)
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    for k in tqdm(range(0, len(order), cfg.batch_size), desc=desc, disable=None):
        idx = order[k:k + cfg.batch_size]
        batch = sequences(tokenizer, [pairs[i] for i in idx], cfg.max_prompt_length, cfg.max_length)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logps, mask = completion_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        for j, i in enumerate(idx):
            sums[i] = float(logps[j].sum())
            if per_token:
                tokens[i] = logps[j][mask[j].bool()].tolist()
    return sums, tokens


def run(ctx, cfg: ReferenceConfig):
    from stages.runner import StageOutput

    pool = ctx.inputs["build_pool"].table()
    check_columns(pool, {"prompt": pa.string(), "generation1": pa.string()}, "reference input (build_pool)")
    rows = pool.to_pylist()
    path = resolve_model(cfg.model, "reference.model")
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path).eval()
    ctx.log.info("reference: log-probs of %d records under %s", len(rows), path)
    columns = {}
    for out_col, gen_col in (("reference_logp1", "generation1"), ("reference_logp2", "generation2"),
                             ("reference_kl_logp", "kl_generation")):
        present = [i for i, r in enumerate(rows) if r.get(gen_col) is not None]
        values: list = [None] * len(rows)
        per_token = cfg.token_logps and gen_col == "generation1"
        if present:
            sums, toks = score(model, tokenizer, [(rows[i]["prompt"], rows[i][gen_col]) for i in present], cfg,
                               per_token, desc=f"reference {gen_col}")
            for i, s in zip(present, sums):
                values[i] = s
            if per_token:
                tok_values: list = [None] * len(rows)
                for i, t in zip(present, toks):
                    tok_values[i] = t
                columns["reference_token_logps1"] = tok_values
        columns[out_col] = values
    columns.setdefault("reference_token_logps1", [None] * len(rows))
    table = pool.select([c for c in pool.column_names if c not in REFERENCE_COLUMNS.names])
    for field in REFERENCE_COLUMNS:
        table = table.append_column(field, pa.array(columns[field.name], type=field.type))
    n = sum(v is not None for v in columns["reference_logp1"])
    return StageOutput(table, {"records": len(rows), "scored_generation1": n, "model": str(path)})



