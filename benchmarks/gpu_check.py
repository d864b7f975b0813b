"""The GPU check, run by benchmarks/gpu_check.sh on a machine with CUDA GPUs (see that script).

On a SmolLM2-shaped model with random weights (its config, SmolLM2's tokenizer from the carried
tiny-llama folder: no download, nothing large to carry):
  sampling   our sample service, hf backend in bf16 and (where vllm is installed) the vllm backend:
             new tokens/s and peak GPU memory
  training   the trainer (stages/training/trainer.fit) on synthetic records, SFT and DPO, in bf16 and
             float32: tokens/s (median of the steps after the first) and peak GPU memory
Writes gpu_check.json into --out and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("gpu_check")
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_smollm2(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.services.models import load_tokenizer, resolve_model

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2)).save_pretrained(folder)
    load_tokenizer(resolve_model("tiny-llama")).save_pretrained(folder)
    return folder


def prompts(n: int) -> list[str]:
    words = "the film was a quiet study of grief and the actors never once let it slip".split()
    return [" ".join(words[i % 7:i % 7 + 6]) + f" {i}" for i in range(n)]


def sampling(model: Path, backend: str) -> dict:
    from stages.config import SampleConfig
    from stages.services.generation import generate

    cfg = SampleConfig(backend=backend, n=4, max_new_tokens=64, batch_size=256, dtype="bfloat16", top_p=1.0, top_k=0)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = generate(model, prompts(256), cfg, 0, log)
    seconds = time.perf_counter() - start
    tokens = sum(s["completion_tokens"] for per_prompt in out for s in per_prompt)
    return {"what": f"sample {backend} bf16", "tokens_per_s": tokens / seconds,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30}


def training(model: Path, objective: str, precision: str, work: Path) -> dict:
    from stages.config import TrainConfig
    from stages.services.models import load_causal_lm, load_tokenizer
    from stages.training.objectives import make_objective
    from stages.training.trainer import fit

    texts = prompts(512)
    rows = [{"prompt": t, "generation1": " and it was good" * 12, "generation2": " and it was bad" * 12,
             "completion": " and it was good" * 12} for t in texts]
    cfg = TrainConfig(objective=objective, model=str(model), batch_size=32, max_steps=12, learning_rate=1e-5,
                      mixed_precision=precision, max_length=192, max_prompt_length=32,
                      **({"dpo": {"reference_free": True}} if objective == "dpo" else {}))
    tokenizer = load_tokenizer(model)
    policy = load_causal_lm(model)
    torch.cuda.reset_peak_memory_stats()
    history = fit(policy, tokenizer, make_objective(cfg), rows, cfg, 0, work / f"{objective}-{precision}")
    rates = [h["tokens_per_s"] for h in history[1:] if h["tokens_per_s"]]
    return {"what": f"train {objective} {precision}", "tokens_per_s": statistics.median(rates),
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
               "torch": torch.__version__, "measurements": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = random_smollm2(Path(tmp) / "smollm2-random")
        runs = [("sample hf bf16", lambda: sampling(model, "hf"))]
        try:
            import vllm  # noqa: F401

            runs.append(("sample vllm bf16", lambda: sampling(model, "vllm")))
        except ImportError:
            print("gpu_check: vllm is not installed here; the vllm sampler is not checked")
        runs += [(f"train {o} {p}", lambda o=o, p=p: training(model, o, p, Path(tmp)))
                 for o in ("sft", "dpo") for p in ("bf16", "no")]
        for name, run in runs:
            try:
                m = run()
            except Exception as e:  # one failed check is a result too; the others still run
                m = {"what": name, "error": f"{type(e).__name__}: {e}"}
            results["measurements"].append(m)
            print("gpu_check:", json.dumps(m))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
