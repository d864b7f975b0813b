"""data_pool: the persistent pool of Quark and NLF rounds (stages/data/pool.py does the work).

Round k's artifact is round k-1's pool after the drop policy plus round k's scored samples, with
the reward quantiles recomputed over it and the training draw marked (`drawn`); earlier rounds'
pools stay on disk untouched, so every round can be inspected (or queried with DuckDB) and resumed.
"""

from __future__ import annotations

from stages.config import DataPoolConfig
from stages.data.pool import PoolPolicy, samples_table, summary, update
from stages.pipeline.context import StageOutput, stage
from stages.pipeline.errors import BadInput


@stage("data_pool", version="1", inputs=("annotate", "reweight", "data_pool@prev"))
def run(ctx, cfg: DataPoolConfig) -> StageOutput:
    source = ctx.inputs.get("reweight") or ctx.inputs["annotate"]
    new = samples_table(source.table(), ctx.round)
    if new.num_rows == 0:
        raise BadInput(f"data_pool: no scored samples in {source.stage} (round {ctx.round})")
    previous = ctx.inputs["data_pool"].table() if "data_pool" in ctx.inputs else None
    policy = PoolPolicy(quantiles=cfg.quantiles, quantile_scope=cfg.quantile_scope, drop=cfg.drop,
                        max_age=cfg.max_age, max_per_prompt=cfg.max_per_prompt,
                        draw_per_quantile=cfg.draw_per_quantile)
    pool = update(previous, new, ctx.round, policy, ctx.seed)
    metrics = summary(pool, ctx.round)
    ctx.log.info("data_pool: %d samples (%d new this round, oldest from round %d), %d drawn for training",
                 metrics["pool_samples"], metrics["new_samples"], metrics["oldest_round"], metrics["drawn"])
    return StageOutput(pool, metrics)
