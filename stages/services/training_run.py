"""Train a policy and write it: in this process, or on several through `accelerate launch`.

    train_and_save(job)       the objective, model and reference set up, `fit`, LoRA merged,
                              model/ and metrics.jsonl written by the main process
    launch(job)               the same on `train.processes` processes: the job goes to a folder
                              (job.json, rows.parquet), `accelerate launch` runs this module's
                              main in each process, and this process waits for them

The train stage stays the one process that owns the artifact: the launched processes write into
its scratch folder and it commits as usual, so a killed launch leaves nothing complete. Killing
the stage's process group stops them all (`align` runs and the workers' launch share it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.pipeline.errors import BadInput
from stages.services.training_setup import attach_reference, prepare

log = logging.getLogger("align")


@dataclass
class TrainJob:
    config: dict  # TrainConfig, as JSON
    seed: int
    init_seed: int  # the stage's RNG state at its start (StageContext.round_seed)
    start: str | None  # the model to start from (last round's policy), else config.model
    resume_dir: str
    out_dir: str  # model/, metrics.jsonl and tracking/ go here
    run_name: str


def train_and_save(job: TrainJob, rows: list[dict]) -> tuple[list[dict], str]:
    """(the per-step history, where the reference came from): the model goes to out_dir/model."""
    from accelerate import PartialState

    from stages.config import TrainConfig
    from stages.training.trainer import fit

    cfg = TrainConfig.model_validate(job.config)
    objective, model, tokenizer = prepare(cfg, rows, job.seed, model_path=job.start)
    mode = attach_reference(objective, cfg, rows, model)
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())  # the one fit's Accelerator joins
    if state.is_main_process:
        log.info("train: %s on %d records, model %s, reference %s%s%s", cfg.objective, len(rows), job.start or cfg.model,
                 mode, f", LoRA r={cfg.lora.r}" if cfg.lora else "",
                 f", {state.num_processes} processes ({state.distributed_type.value})" if state.num_processes > 1 else "")
    out = Path(job.out_dir)
    history = fit(model, tokenizer, objective, rows, cfg, job.seed, Path(job.resume_dir),
                  tracking_dir=out / "tracking", run_name=job.run_name, save_to=out / "model")
    if state.is_main_process:
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    state.wait_for_everyone()
    return history, mode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: TrainJob, rows: list[dict], processes: int, accelerate_config: str | None = None) -> tuple[list[dict], str]:
    """Run `train_and_save` on `processes` processes (or as `accelerate_config` says) and wait."""
    with tempfile.TemporaryDirectory(prefix="align-launch-") as tmp:
        return _launch(Path(tmp), job, rows, processes, accelerate_config)


def check_accelerate_config(path: str) -> None:
    """The launch config exists, and asks for nothing this machine would silently do otherwise:
    accelerate runs FSDP and DeepSpeed on accelerators only, and without one it launches plain DDP
    processes over gloo (unsharded, under the name of the sharded run)."""
    import yaml

    if not Path(path).is_file():
        raise BadInput(f"train.accelerate_config: no such file {path}")
    try:
        kind = (yaml.safe_load(Path(path).read_text()) or {}).get("distributed_type")
    except (yaml.YAMLError, AttributeError) as e:
        raise BadInput(f"train.accelerate_config: {path} is not an accelerate config ({type(e).__name__})") from None
    import torch

    if kind in ("FSDP", "DEEPSPEED") and not torch.cuda.is_available():
        raise BadInput(f"train.accelerate_config: {path} asks for {kind}, which accelerate runs on GPUs only; "
                       "without CUDA it would train unsharded as DDP (use train.processes for CPU data parallelism)")


def _launch(folder: Path, job: TrainJob, rows: list[dict], processes: int, accelerate_config: str | None):
    (folder / "job.json").write_text(json.dumps(asdict(job)))
    pq.write_table(pa.Table.from_pylist(rows), folder / "rows.parquet")
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        check_accelerate_config(accelerate_config)
        cmd += ["--config_file", accelerate_config]
    else:
        # accelerate's torchrun launcher; on a machine without CUDA the processes' Accelerator(cpu=True)
        # joins them over gloo (accelerate's --cpu flag would start a single process).
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    cmd += ["-m", "stages.services.training_run", str(folder)]
    env = {**os.environ}
    if not accelerate_config and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))  # the cores, shared out
    log.info("train: launching %s", " ".join(cmd[2:]))
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"train: the {processes} training processes failed (exit {done.returncode}); their log is above")
    history = [json.loads(line) for line in (Path(job.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return history, json.loads((folder / "reference_mode").read_text())


def main(folder: str) -> None:
    from stages.pipeline.seeds import seed_everything

    logging.basicConfig(level=logging.INFO, format="%(asctime)s | rank " + os.environ.get("RANK", "0") + " | %(message)s")
    folder_path = Path(folder)
    job = TrainJob(**json.loads((folder_path / "job.json").read_text()))
    rows = pq.read_table(folder_path / "rows.parquet").to_pylist()
    seed_everything(job.init_seed)
    _, mode = train_and_save(job, rows)
    if os.environ.get("RANK", "0") == "0":
        (folder_path / "reference_mode").write_text(json.dumps(mode))


if __name__ == "__main__":
    main(sys.argv[1])
