"""data_pool: the persistent pool of Quark and NLF rounds (stages/data/pool.py does the work).

Round k's artifact is round k-1's pool after the drop policy plus round k's scored samples, with
the reward quantiles recomputed over it and the training draw marked (`drawn`): a narrow table of
sample keys (data.parquet). Round k's samples themselves are written once, beside it
(samples.parquet); `stages.data.pool.pool_samples` joins a pool with every round's samples. Earlier rounds' pools
stay on disk untouched, so every round can be inspected (or queried with DuckDB) and resumed.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from stages.config import DataPoolConfig
from stages.data.pool import SAMPLES_FILE, PoolPolicy, duplicate_key, samples_table, summary, update
from stages.pipeline.context import StageOutput, stage
from stages.pipeline.errors import BadInput

@stage("data_pool", version="2", inputs=("annotate", "reweight", "data_pool@prev"))
def run(ctx, cfg: DataPoolConfig) -> StageOutput:
    source = ctx.inputs.get("reweight") or ctx.inputs["annotate"]
    new = samples_table(source.table(), ctx.round)
    if new.num_rows == 0:
        raise BadInput(f"data_pool: no scored samples in {source.stage} (round {ctx.round})")
    for column in ("split", "prompt_id", "sample_index"):
        if new.column(column).null_count:
            raise BadInput(f"data_pool: column '{column}' of {source.stage} has nulls (round {ctx.round})")
    if (dup := duplicate_key(new)) is not None:
        raise BadInput(f"data_pool: {source.stage} has two samples with split, prompt_id, round, sample_index = {dup}")
    previous = ctx.inputs["data_pool"].table() if "data_pool" in ctx.inputs else None
    policy = PoolPolicy(quantiles=cfg.quantiles, quantile_scope=cfg.quantile_scope, drop=cfg.drop,
                        max_age=cfg.max_age, max_per_prompt=cfg.max_per_prompt,
                        draw_per_quantile=cfg.draw_per_quantile)
    pool = update(previous, new, ctx.round, policy, ctx.seed)
    pq.write_table(new, ctx.workdir / SAMPLES_FILE)
    metrics = summary(pool, ctx.round)
    ctx.log.info("data_pool: %d samples (%d new this round, oldest from round %d), %d drawn for training",
                 metrics["pool_samples"], metrics["new_samples"], metrics["oldest_round"], metrics["drawn"])
    return StageOutput(pool, metrics)
