"""Training set-up shared by the train and evaluate stages: the pool's records, the objective
with its model and tokenizer, and where reference log-probs come from."""

from __future__ import annotations

import pyarrow as pa

from stages.pipeline.errors import BadInput
from stages.services.models import load_causal_lm, load_model_for, load_tokenizer, resolve_model
from stages.training.objectives import Objective, make_objective
from stages.data.schemas import check_columns, check_non_null


def pool_rows(ctx, split: str) -> list[dict]:
    """The records of `split`: the reference stage's table when the flow has one (the pool plus
    cached reference log-probs), else the pool itself."""
    source = ctx.inputs.get("reference") or ctx.inputs["build_pool"]
    table = source.table()
    check_columns(table, {"prompt": pa.string(), "generation1": pa.string(), "split": pa.string()},
                  f"{ctx.stage} input ({source.stage})")
    return [r for r in table.to_pylist() if r["split"] == split]


def prepare(cfg, rows: list[dict], seed: int, model_path=None, training: bool = True):
    """Objective, model and tokenizer ready to train (or, with training=False, evaluate) on `rows`.
    `model_path` overrides cfg.model: the previous round's policy, or the trained model."""
    objective = make_objective(cfg)
    check_non_null(rows, [c for c in objective.needs if c != "prompt"], f"train ({cfg.objective})")
    path = model_path or resolve_model(cfg.model, "train.model")
    tokenizer = load_tokenizer(path)
    model = load_model_for(objective.model_kind, path, tokenizer)
    objective.prepare_model(model, tokenizer, rows, seed)
    if cfg.lora is not None and training:
        from peft import get_peft_model

        model = get_peft_model(model, cfg.lora.lora_config())
    return objective, model, tokenizer


def attach_reference(objective: Objective, cfg, rows: list[dict], model) -> str:
    """Decide where reference log-probs come from; returns "cached", "resident" or "none"."""
    if not objective.uses_reference():
        return "none"
    needs_logits = objective.needs_reference_logits()
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


class AdapterOff:
    """The LoRA policy with its adapters switched off: the reference model without a second copy."""

    def __init__(self, peft_model):
        self.model = peft_model

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_decoder(self):
        decoder = self.model.get_decoder()
        model = self.model

        def run(**kw):
            with model.disable_adapter():
                return decoder(**kw)
        return run
