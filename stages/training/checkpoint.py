"""Resumable training checkpoints without pickle: tensors in safetensors, the rest in JSON.

    <dir>/model.safetensors      weights (bf16 in bf16 mode: what the model computes with)
    <dir>/master.safetensors     bf16 mode: the float32 master weights, keyed by parameter name
    <dir>/optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>"
    <dir>/rng.safetensors        torch RNG state(s) of process 0 (rng-<rank>.safetensors: the others')
    <dir>/state.json             step, position in the data, scheduler, param groups, Python/NumPy RNG

Under torch.distributed (DDP) the replicas' weights and optimizer states are identical, so process
0 writes them; every process writes its own RNG state. Barriers order the steps: process 0 makes
the scratch folder, every process writes its RNG, process 0 writes the rest and swaps the folder
in, and nobody goes on until the swap is done. A resume on a different number of processes reads
process 0's RNG where its own is missing.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from stages.pipeline.atomic import recover, swap_in


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.item()
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.generic):
        return x.item()
    return x


def has_checkpoint(path: Path) -> bool:
    """Whether `path` holds a complete checkpoint (finishing a swap a kill interrupted first)."""
    recover(path)
    return (path / "state.json").exists()


def _rng_file(rank: int) -> str:
    return "rng.safetensors" if rank == 0 else f"rng-{rank}.safetensors"


def _no_barrier() -> None:
    pass


def _names(model) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def save_checkpoint(path: Path, model, optimizer, scheduler, progress: dict, rank: int = 0, world: int = 1,
                    barrier: Callable[[], None] = _no_barrier, masters=None) -> None:
    """Write a complete checkpoint next to `path`, then swap it in (a kill never leaves half of one)."""
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / _rng_file(rank)))
    if rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
        if masters is not None:
            save_file({k: v.contiguous() for k, v in masters.state_dict(_names(model)).items()},
                      str(tmp / "master.safetensors"))
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, state in opt["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{key}"] = value
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        np_state = np.random.get_state()
        state = {
            "progress": progress,
            "processes": world,
            # LambdaLR stores plain-function lambdas as None; the schedule itself is rebuilt from the config.
            "scheduler": _jsonable(scheduler.state_dict()),
            "param_groups": _jsonable(opt["param_groups"]),
            "optimizer_scalars": _jsonable(scalars),
            "python_rng": _jsonable(random.getstate()),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
    barrier()  # every RNG file is in before the folder is swapped in
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps(state))
        swap_in(tmp, path)
    barrier()


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0, masters=None) -> dict:
    """Restore everything saved by `save_checkpoint`; returns the saved progress dict."""
    state = json.loads((path / "state.json").read_text())
    load_model(model, str(path / "model.safetensors"))
    if masters is not None:
        if not (path / "master.safetensors").exists():
            raise RuntimeError(f"{path}: a float32 checkpoint cannot resume a bf16 run (train.mixed_precision "
                               "changed); delete it to start over")
        masters.load_state_dict(load_file(str(path / "master.safetensors")), _names(model))
    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    own = path / _rng_file(rank)
    rng = load_file(str(own if own.exists() else path / _rng_file(0)))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    version, inner, gauss = state["python_rng"]
    random.setstate((version, tuple(inner), gauss))
    n = state["numpy_rng"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    return state["progress"]


# -- sharded training (FSDP, DeepSpeed) --------------------------------------------------------------

def save_sharded_checkpoint(path: Path, accelerator, progress: dict) -> None:
    """Under FSDP or DeepSpeed each process holds only its shards: accelerate's own save_state writes
    them (model, optimizer, scheduler, every process's RNG) into the scratch resume folder, never an
    artifact, then progress.json; process 0 swaps the complete folder in once every process is done."""
    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(_jsonable(progress)))
        swap_in(tmp, path)
    accelerator.wait_for_everyone()


def load_sharded_checkpoint(path: Path, accelerator) -> dict:
    accelerator.load_state(str(path))
    return json.loads((path / "progress.json").read_text())


def has_sharded_checkpoint(path: Path) -> bool:
    recover(path)
    return (path / "progress.json").exists()
