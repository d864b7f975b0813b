"""The model card of a trained policy (`train/model/README.md`): what a reader of the folder, or of
the hub after `push_to_hub`, needs to know: the base model, the objective and its options, the data
it trained on, the training settings and result, and where the rest is (the stage's manifest)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from stages.training.precision import resolve

# Our named models, by their hub ids (the folders `align models prepare` makes come from these).
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def base_model(ref: str) -> str | None:
    """The hub id of a model reference where it has one (None for a local folder or the test model)."""
    if ref in HUB_IDS:
        return HUB_IDS[ref]
    return ref if ref.count("/") == 1 and not Path(ref).exists() else None


def write_model_card(model_dir: Path, cfg, experiment: str, round_: int, start: str | None, records: int,
                     metrics: dict) -> Path:
    options = getattr(cfg, cfg.objective, None)
    settings = {"objective": cfg.objective, "learning rate": cfg.learning_rate, "scheduler": cfg.lr_scheduler,
                "batch size": f"{cfg.batch_size} x {cfg.grad_accum} accumulation", "epochs": cfg.epochs,
                "max steps": cfg.max_steps, "max length": f"{cfg.max_length} ({cfg.max_prompt_length} prompt)",
                "precision": resolve(cfg.mixed_precision), "LoRA": cfg.lora.model_dump() if cfg.lora else "no (every weight)"}
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    opts = options.model_dump() if options is not None and options.model_fields else {}
    result = {k: metrics.get(k) for k in ("steps", "final_loss", "reference", "median_tokens_per_s")}
    text = f"""---
{ModelCardData(base_model=base_model(cfg.model), library_name="transformers",
               tags=["align-workbench", cfg.objective]).to_yaml()}
---

# {experiment}, round {round_}: {cfg.objective}

A causal LM trained by align-workbench with `train.objective: {cfg.objective}`,
starting from {f"round {round_ - 1}'s policy (`{start}`)" if start else f"`{cfg.model}`"}, on {records} training
records of the experiment's data pool (round {round_}).

## Training

| setting | value |
|---|---|
{rows}

{f"Objective options (`train.{cfg.objective}`): `{opts}`" if opts else ""}

## Result

Steps {result['steps']}, final loss {result['final_loss']}, reference log-probs: {result['reference']}.
The held-out evaluation of this round is in its `evaluate` stage's manifest; every setting of the
run, the inputs' fingerprints and the provenance (commit, package versions, machine) are in the
`train` stage's `manifest.json` beside this folder.
"""
    path = Path(model_dir) / "README.md"
    ModelCard(text).save(path)
    return path
