"""FSDP. accelerate runs FSDP (and DeepSpeed) on GPUs only: on CPU its launcher starts plain DDP
processes over gloo, so the shipped configs/accelerate/fsdp.yaml is refused there in one line
instead of training unsharded under the sharded run's name. What can run on CPU runs here:

- FSDP2 itself (torch's fully_shard, what accelerate applies for fsdp_version 2, each decoder layer
  its own unit) around the trainer's ObjectiveForward, two processes over gloo: the objectives call
  the decoder and the LM head directly, and every shard is gathered inside the wrapped forward, so
  the gradients equal one process's at the same global batch;
- the sharded checkpoint (accelerate's save_state into the scratch resume folder) restores model,
  optimizer, schedule and progress.
The whole launch runs in benchmarks/gpu_check.sh where two GPUs are lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, align, needs_prepared

pytestmark = needs_prepared


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the FSDP launch runs")
def test_fsdp_without_gpus_is_refused_in_one_line(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    cfg.update(num_processes=2, mixed_precision="no")
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = align("run", ROOT / "configs" / "smoke_dpo.yaml", "--artifacts", tmp_path / "a", "--no-prefect",
                 "--set", f"train.accelerate_config={path}")
    assert done.returncode == 2
    assert (f"train.accelerate_config: {path} asks for FSDP, which accelerate runs on GPUs only; without CUDA it "
            "would train unsharded as DDP") in done.stderr
    assert (tmp_path / "a" / "smoke_dpo" / "round-0" / "build_pool" / "manifest.json").exists()  # nothing lost


@pytest.mark.parametrize("objective", ["dpo", "sft"])
def test_fsdp2_gathers_every_shard_inside_the_objectives_forward(tmp_path, objective):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "integration" / "fsdp_worker.py"),
                           objective, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["max_grad"] > 1e-3 and result["max_diff"] < 1e-5


def test_a_sharded_checkpoint_restores_model_optimizer_schedule_and_progress(tmp_path):
    from accelerate import Accelerator
    from transformers import get_scheduler

    from stages.training.checkpoint import has_sharded_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=10)
        acc = Accelerator(cpu=True)
        model, opt = acc.prepare(model, opt)
        acc.register_for_checkpointing(sched)
        return acc, model, opt, sched

    acc, model, opt, sched = setup()
    for _ in range(3):
        model(torch.ones(1, 4)).sum().backward()
        opt.step(), sched.step(), opt.zero_grad()
    ckpt = tmp_path / "resume" / "checkpoint"
    save_sharded_checkpoint(ckpt, acc, {"step": 3, "history": [{"loss": 1.0}]})
    assert has_sharded_checkpoint(ckpt)
    acc2, model2, opt2, sched2 = setup()
    assert load_sharded_checkpoint(ckpt, acc2) == {"step": 3, "history": [{"loss": 1.0}]}
    assert torch.equal(model2.weight, model.weight) and sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
