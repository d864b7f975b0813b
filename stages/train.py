"""train: fit the configured objective on the pool's training records.

Writes `model/` (safetensors weights + tokenizer, loadable with `from_pretrained`; LoRA adapters
are merged in) and `metrics.jsonl`; its table is the per-step metrics. Reads the reference stage's
table when the flow has one (the pool plus cached reference log-probs), else the pool itself.
Checkpoints for resuming live in the runner's resume folder, outside the artifact.
"""

from __future__ import annotations

import json

import pyarrow as pa
import torch

from stages.config import TrainConfig
from stages.errors import BadInput
from stages.models import load_causal_lm, load_model_for, load_tokenizer, model_identity, resolve_model
from stages.objectives import AdapterOff, Objective, make_objective
from stages.schemas import check_columns, check_non_null
from stages.trainer import fit

NAME = "train"
VERSION = "2"
INPUTS = ("build_pool", "reference", "train@prev")


def identity(cfg: TrainConfig) -> dict:
    ident = {"model": model_identity(cfg.model, "train.model")}
    if cfg.reference_model:
        ident["reference_model"] = model_identity(cfg.reference_model, "train.reference_model")
    return ident


def pool_rows(ctx, split: str) -> list[dict]:
    source = ctx.inputs.get("reference") or ctx.inputs["build_pool"]
    table = source.table()
    check_columns(table, {"prompt": pa.string(), "generation1": pa.string(), "split": pa.string()},
                  f"{ctx.stage} input ({source.stage})")
    return [r for r in table.to_pylist() if r["split"] == split]


def add_control_tokens(model, tokenizer, rows: list[dict], seed: int) -> list[str]:
    """Quark's reward tokens: new vocabulary entries whose embeddings are drawn from the mean and
    std of the existing ones (per dimension), so they start as typical, not arbitrary, tokens."""
    controls = sorted({r["control"] for r in rows if r.get("control")})
    new = [t for t in controls if t not in tokenizer.get_vocab()]
    if not new:
        return []
    tokenizer.add_tokens(new, special_tokens=True)
    emb = model.get_input_embeddings().weight
    old = emb.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        mean, std = weight[:old].mean(0), weight[:old].std(0)
        g = torch.Generator().manual_seed(seed)
        added = weight.shape[0] - old
        weight[old:] = mean + std * torch.randn(added, weight.shape[1], generator=g)
    return new


def attach_reference(objective: Objective, cfg: TrainConfig, rows: list[dict], model) -> str:
    """Decide where reference log-probs come from; returns "cached", "resident" or "none"."""
    if not objective.uses_reference():
        return "none"
    needs_logits = objective.name in ("quark", "nlf") and objective.opt.kl == "exact"
    cached = not needs_logits and all(r.get(c) is not None for r in rows for c in objective.reference_columns)
    mode = cfg.reference if cfg.reference != "auto" else ("cached" if cached else "resident")
    if mode == "cached" and not cached:
        raise BadInput(f"train.reference: 'cached' needs the pool's {', '.join(objective.reference_columns)} "
                       "columns for every record: add the reference stage to the flow"
                       + (" (or set kl: cached)" if needs_logits else ""))
    if mode == "resident":
        for r in rows:  # make sure the resident model, not stale columns, supplies the reference
            for c in objective.reference_columns:
                r[c] = None
        if cfg.lora is not None and cfg.reference_model is None:
            objective.ref_model = AdapterOff(model)
        else:
            ref = load_causal_lm(resolve_model(cfg.reference_model or cfg.model, "train.reference_model")).eval()
            ref.requires_grad_(False)
            objective.ref_model = ref
    return mode


def prepare(cfg: TrainConfig, rows: list[dict], seed: int, model_path=None, training: bool = True):
    """Objective, model and tokenizer ready to train (or, with training=False, evaluate) on `rows`.
    `model_path` overrides cfg.model: the previous round's policy, or the trained model."""
    objective = make_objective(cfg)
    check_non_null(rows, [c for c in objective.needs if c != "prompt"], f"train ({cfg.objective})")
    path = model_path or resolve_model(cfg.model, "train.model")
    tokenizer = load_tokenizer(path)
    model = load_model_for(objective.model_kind, path, tokenizer)
    if cfg.objective == "quark":
        add_control_tokens(model, tokenizer, rows, seed)
    if cfg.lora is not None and training:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                 target_modules=cfg.lora.target_modules,
                                                 modules_to_save=["embed_tokens"] if cfg.objective == "quark" else None))
    return objective, model, tokenizer


def run(ctx, cfg: TrainConfig):
    from stages.runner import StageOutput

    rows = pool_rows(ctx, "train")
    if not rows:
        raise BadInput("train: the pool has no training records (split 'train')")
    start = ctx.inputs["train"].local_dir() / "model" if "train" in ctx.inputs else None  # online: last round's policy
    objective, model, tokenizer = prepare(cfg, rows, ctx.seed, model_path=start)
    mode = attach_reference(objective, cfg, rows, model)
    ctx.log.info("train: %s on %d records, model %s, reference %s%s", cfg.objective, len(rows), start or cfg.model, mode,
                 f", LoRA r={cfg.lora.r}" if cfg.lora else "")
    history = fit(model, tokenizer, objective, rows, cfg, ctx.seed, ctx.resume_dir)

    if cfg.lora is not None:
        model = model.merge_and_unload()  # downstream stages load a plain model
    out = ctx.workdir / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (ctx.workdir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    last = history[-1]
    speeds = sorted(h["tokens_per_s"] for h in history if h["tokens_per_s"])
    metrics = {"steps": len(history), "final_loss": last["loss"], "records": len(rows), "reference": mode,
               "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
               **{k: v for k, v in last.items() if k not in ("step", "epoch", "loss", "learning_rate", "grad_norm",
                                                             "tokens", "tokens_per_s")}}
    return StageOutput(pa.Table.from_pylist(history), metrics)
