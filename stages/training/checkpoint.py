"""Resumable training checkpoints without pickle: tensors in safetensors, the rest in JSON.

    <dir>/model.safetensors      weights
    <dir>/optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>"
    <dir>/rng.safetensors        torch RNG state(s)
    <dir>/state.json             step, position in the data, scheduler, param groups, Python/NumPy RNG

Single-process: the state is one process's (its RNG, its whole optimizer state). Under
torch.distributed with more than one process `save_checkpoint` refuses rather than let every rank
write the same folder; sharded checkpoints come with multi-process training.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

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


def _check_single_process() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(f"training checkpoints are single-process, but this run has "
                           f"{dist.get_world_size()} processes; run the train stage in one process")


def has_checkpoint(path: Path) -> bool:
    """Whether `path` holds a complete checkpoint (finishing a swap a kill interrupted first)."""
    recover(path)
    return (path / "state.json").exists()


def save_checkpoint(path: Path, model, optimizer, scheduler, progress: dict) -> None:
    """Write a complete checkpoint next to `path`, then swap it in (a kill never leaves half of one)."""
    _check_single_process()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    np_state = np.random.get_state()
    state = {
        "progress": progress,
        # LambdaLR stores plain-function lambdas as None; the schedule itself is rebuilt from the config.
        "scheduler": _jsonable(scheduler.state_dict()),
        "param_groups": _jsonable(opt["param_groups"]),
        "optimizer_scalars": _jsonable(scalars),
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    (tmp / "state.json").write_text(json.dumps(state))
    swap_in(tmp, path)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything saved by `save_checkpoint`; returns the saved progress dict."""
    state = json.loads((path / "state.json").read_text())
    load_model(model, str(path / "model.safetensors"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    version, inner, gauss = state["python_rng"]
    random.setstate((version, tuple(inner), gauss))
    n = state["numpy_rng"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    return state["progress"]
