#!/usr/bin/env bash
# The prepared GPU check: vLLM sampling, bf16 and float32 training, and (with 2+ GPUs) a DDP and an
# FSDP launch and an FSDP run killed after a checkpoint and resumed, on this machine's GPUs;
# tokens/s and peak GPU memory into $OUT (the device tool's folder) or benchmarks/results/gpu_check/.
# On a machine without a CUDA GPU it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Needs the project importable (`pip install -e .`, or this script's PYTHONPATH) with torch,
# transformers, accelerate, peft, datasets; vllm where it is installed. Nothing is downloaded: the
# model is SmolLM2's shape with random weights and SmolLM2's tokenizer from the tiny-llama folder,
# and the launches train on the movie snippets, so carry artifacts/_cache/models/tiny-llama and
# artifacts/_cache/data (both small) from a machine that ran `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-benchmarks/results/gpu_check}
gpus=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$gpus" = 0 ]; then
    echo "gpu_check: no CUDA GPU here; nothing to check"
    exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.csv"
$PY benchmarks/gpu_check.py --out "$out" 2>&1 | tee "$out/log.txt"
if [ "$gpus" -ge 2 ]; then
    for launch in ddp_gpus fsdp; do
        sed "s/^num_processes: .*/num_processes: $gpus/" "configs/accelerate/$launch.yaml" > "$out/$launch.yaml"
        start=$(date +%s)
        if $PY -m flows.cli run configs/smoke.yaml --no-prefect --artifacts "$out/artifacts-$launch" \
               --set train.accelerate_config="$out/$launch.yaml" --set train.max_steps=8 >> "$out/log.txt" 2>&1; then
            echo "gpu_check: launch $launch on $gpus GPUs: ok in $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
        else
            echo "gpu_check: launch $launch on $gpus GPUs: FAILED (see $out/log.txt)" | tee -a "$out/log.txt"
        fi
    done
    # FSDP killed after its first sharded checkpoint (Accelerator.save_state), then re-run: it must
    # resume there and end with the uninterrupted launch's losses.
    killed="$out/artifacts-fsdp-killed"
    setsid $PY -m flows.cli run configs/smoke.yaml --no-prefect --artifacts "$killed" \
        --set train.accelerate_config="$out/fsdp.yaml" --set train.max_steps=8 --set train.checkpoint_every=2 \
        >> "$out/log.txt" 2>&1 &
    pid=$!
    for _ in $(seq 3000); do
        compgen -G "$killed/.tmp/resume-*-train-*/checkpoint/progress.json" > /dev/null && break
        kill -0 "$pid" 2> /dev/null || break
        sleep 0.1
    done
    kill -KILL -- -"$pid" 2> /dev/null || true
    wait "$pid" 2> /dev/null || true
    if $PY -m flows.cli run configs/smoke.yaml --no-prefect --artifacts "$killed" \
           --set train.accelerate_config="$out/fsdp.yaml" --set train.max_steps=8 --set train.checkpoint_every=2 \
           > "$out/fsdp-resume.txt" 2>&1 && grep -q "train: resumed from checkpoint" "$out/fsdp-resume.txt"; then
        $PY - "$out/artifacts-fsdp" "$killed" <<'PY' | tee -a "$out/log.txt"
import json, sys
from pathlib import Path
losses = [[json.loads(l)["loss"] for l in next(Path(a).glob("*/round-0/train/metrics.jsonl")).read_text().splitlines()]
          for a in sys.argv[1:]]
gap = max(abs(x - y) for x, y in zip(*losses)) if len(losses[0]) == len(losses[1]) else float("inf")
print(f"gpu_check: fsdp killed and resumed: {'ok' if gap < 1e-3 else 'FAILED'} (largest loss gap to the uninterrupted launch {gap:.2e})")
PY
    else
        echo "gpu_check: fsdp killed and resumed: FAILED, no resume (see $out/fsdp-resume.txt)" | tee -a "$out/log.txt"
    fi
else
    echo "gpu_check: one GPU: the DDP and FSDP launches need two or more; not checked" | tee -a "$out/log.txt"
fi
