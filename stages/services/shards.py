"""Spread a stage's rows over a Ray cluster: contiguous shards, one Ray task each, results in order.

    map_shards(fn, items, shards, *args)  ->  (fn's results, concatenated in shard order; where each ran)

With `shards == 1` fn runs here, without Ray. With more, `ray.init()` joins the cluster that
RAY_ADDRESS names, as Ray's own tools do (`ray start --head` on one machine, `ray start --address
HEAD:PORT` on the others), or starts a local one; each shard is a task Ray places on any node
with a free CPU (or GPU, with `gpus`). fn must be importable (a module-level function): workers
import it from the installed package, so every node runs the same code.

Each shard gets its own seed (`shard_seed`): shard 0 keeps the stage's, so one shard is exactly the
single-process result, and the same seed and shard count give the same rows run to run. Another
shard count samples other (equally distributed) generations; scores and log-probs change only in
the last float digits, from different batch padding.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Sequence

log = logging.getLogger("align")


def split(items: Sequence, shards: int) -> list[list]:
    """`shards` contiguous parts whose sizes differ by at most one (empty parts dropped)."""
    per, extra = divmod(len(items), shards)
    parts, start = [], 0
    for i in range(shards):
        end = start + per + (i < extra)
        parts.append(list(items[start:end]))
        start = end
    return [p for p in parts if p]


def shard_seed(seed: int, shard: int) -> int:
    return seed if shard == 0 else (seed * 1_000_003 + shard) % 2**31


def _where() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _run_shard(fn: Callable, part: list, shard: int, args: tuple, seed: int | None) -> tuple[list, str]:
    from stages.pipeline.seeds import seed_everything

    if seed is not None:
        seed_everything(seed)  # the RNG state the stage started from (a fresh head is drawn alike)
    node = ""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001 - outside Ray: no node id
        pass
    logging.basicConfig(level=logging.INFO)
    return fn(part, shard, *args), f"{_where()} node {node}".strip()


def _connect() -> None:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        log.info("shards: joining the Ray cluster at %s", address or "(a new local one)")
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)


def map_shards(fn: Callable, items: Sequence, shards: int, *args, seed: int | None = None,
               gpus: float = 0) -> tuple[list, list[str]]:
    """fn(part, shard_index, *args) -> list, for each contiguous part of `items`. `seed`: the
    stage's starting RNG seed, set again in every Ray task (the runner set it here)."""
    if shards <= 1 or len(items) <= 1:
        return fn(list(items), 0, *args), [_where()]
    import ray

    _connect()
    # SPREAD: shards are heavy (a model each), so one per node before two on any node.
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0, scheduling_strategy="SPREAD")(_run_shard)
    refs = [task.remote(fn, part, i, args, seed) for i, part in enumerate(split(items, shards))]
    out, where = [], []
    for result, place in ray.get(refs):
        out.extend(result)
        where.append(place)
    log.info("shards: %d shards ran on %s", len(where), ", ".join(sorted(set(where))))
    return out, where
