"""Run by test_fsdp.py under `torch.distributed.run` (2 processes, gloo): an objective's loss on
FSDP2 (torch's fully_shard, what accelerate applies for fsdp_version 2) around ObjectiveForward,
each decoder layer its own unit as TRANSFORMER_BASED_WRAP makes them; rank 0 writes the largest
difference from one process's gradient at the same global batch."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from stages.config import TrainConfig
from stages.services.models import build_tiny_llama, load_causal_lm, load_tokenizer
from stages.training.objectives import make_objective
from stages.training.trainer import ObjectiveForward

ROWS = [{"prompt": f"The film {i} was", "generation1": " great fun from start to end", "generation2": " a bore",
         "completion": " great fun", "generation1_reward": float(i % 3), "control": "<|quark_0|>"} for i in range(8)]


def loss_and_grads(objective_name: str, shard: bool, rank: int, world: int):
    path = build_tiny_llama()
    model, tok = load_causal_lm(path), load_tokenizer(path)
    options = {"dpo": {"reference_free": True}, "sft": {}}[objective_name]
    cfg = TrainConfig(objective=objective_name, model="tiny-llama", **({objective_name: options} if options else {}))
    objective = make_objective(cfg)
    objective.prepare_model(model, tok, ROWS, 0)
    module = ObjectiveForward(model, objective)
    rows = ROWS
    if shard:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(module)
        rows = ROWS[rank::world]
    per_example, _ = module(objective.collate(rows, tok))
    (per_example.sum() / len(ROWS) * (world if shard else 1)).backward()  # FSDP averages: scaled to the sum
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in module.named_parameters()}


def main(objective_name: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # One process's gradient first, so that neither rank sits idle in gloo while the other computes:
    # a rank that tears its process group down while its peer is still busy can abort at exit
    # ("terminate called without an active exception") on a loaded machine.
    one = loss_and_grads(objective_name, False, 0, 1) if rank == 0 else None
    sharded = loss_and_grads(objective_name, True, rank, world)
    if rank == 0:
        diff = max((sharded[n] - one[n]).abs().max().item() for n in one)
        scale = max(one[n].abs().max().item() for n in one)
        with open(out, "w") as f:
            json.dump({"max_diff": diff, "max_grad": scale, "params": len(one)}, f)
    dist.barrier()  # both ranks leave together
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
