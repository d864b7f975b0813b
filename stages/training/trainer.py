"""One training loop for every objective, on accelerate.

The objective turns records into tensors and per-example losses; this loop applies the
per-example weights (sum(w * loss) / sum(w) per micro-batch), accumulates gradients, clips, steps
AdamW and the LR schedule, logs one metrics row per optimizer step, and writes a resumable
checkpoint every `checkpoint_every` steps. A killed run resumes from its last checkpoint and ends
with the same weights as an uninterrupted one (data order is a pure function of seed and epoch).

Precision (train.mixed_precision, stages/training/precision.py): float32, or bf16 compute with
float32 master weights; auto is bf16 where the hardware runs it natively. Sharded training (FSDP,
DeepSpeed) hands the choice to accelerate's own mixed precision.

Under torch.distributed (train.processes > 1, launched by services/training_run.py) every process
builds the same micro-batches and takes its shard of each (whole groups for grouped objectives).
Each shard's loss is sum(w * loss) over its examples divided by the weight of the whole
micro-batch (summed across processes), so the sum of the processes' gradients is exactly the
one-process gradient at the same global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType, PartialState
from tqdm.auto import tqdm
from transformers import get_scheduler

from stages.training import allocator, precision
from stages.training.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from stages.training.distributed_ops import all_reduce_gradients, idle
from stages.training.lean_layers import make_lean, native_gqa
from stages.training.losses import weighted_mean
from stages.training.objectives import Objective

log = logging.getLogger("align")


def epoch_batches(rows: list[dict], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                  group_key: str | None = None) -> list[list[dict]]:
    """Shuffled micro-batches; with grouping, similar lengths share a batch (less padding).

    With `group_key`, rows sharing that key (a prompt's samples) stay together and batch_size
    counts groups."""
    if group_key:
        groups: dict = {}
        for r in rows:
            groups.setdefault(r[group_key], []).append(r)
        units = list(groups.values())
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(units), generator=g).tolist()
        return [[r for i in order[k:k + batch_size] for r in units[i]] for k in range(0, len(order), batch_size)]
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(rows), generator=g).tolist()
    if group_by_length:
        size = lambda i: sum(len(rows[i].get(c) or "") for c in ("prompt", "generation1", "generation2"))  # noqa: E731
        mega = batch_size * 16
        order = [i for k in range(0, len(order), mega) for i in sorted(order[k:k + mega], key=size, reverse=True)]
    batches = [[rows[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()  # don't always start with the longest
    return [batches[i] for i in perm]


class NonFiniteLoss(RuntimeError):
    """A training step's loss or gradient norm is NaN or infinite: the stage stops."""


def shard(micro: list[dict], rank: int, world: int, group_key: str | None = None) -> list[dict]:
    """This process's contiguous share of a micro-batch; rows sharing `group_key` stay together."""
    if world == 1:
        return micro
    units: list[list[dict]] = []
    for r in micro:
        if group_key and units and units[-1][0][group_key] == r[group_key]:
            units[-1].append(r)
        else:
            units.append([r])
    per, extra = divmod(len(units), world)
    start = rank * per + min(rank, extra)
    return [r for u in units[start:start + per + (rank < extra)] for r in u]


def fit(model, tokenizer, objective: Objective, rows: list[dict], cfg, seed: int, resume_dir: Path,
        tracking_dir: Path | None = None, run_name: str = "train", save_to: Path | None = None) -> list[dict]:
    """Train `model` in place on `rows`; returns one metrics dict per optimizer step. With
    `cfg.log_with` the steps also go to those experiment trackers (accelerate's), files under
    `tracking_dir` for the ones that write files (TensorBoard). With `save_to` the main process
    writes the trained model there (LoRA merged in), loadable with `from_pretrained`."""
    state = PartialState(cpu=not torch.cuda.is_available())
    sharded = state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    mode = precision.resolve(cfg.mixed_precision, state.device.type)
    accelerator = Accelerator(mixed_precision=mode if sharded else "no", cpu=not torch.cuda.is_available(),
                              log_with=list(cfg.log_with) or None,
                              project_dir=str(tracking_dir) if tracking_dir and cfg.log_with else None)
    if cfg.log_with:
        accelerator.init_trackers(run_name, config={k: v for k, v in cfg.model_dump(mode="json").items()
                                                    if isinstance(v, (int, float, str, bool))})
    torch.manual_seed(seed)
    if accelerator.device.type == "cpu" and allocator.current() != "jemalloc":
        log.info("train: running on the system malloc; with jemalloc (apt-get install libjemalloc2) `align` "
                 "peaks about 15% lower")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lean_layers:
        log.debug("train: lean layers %s", make_lean(model))
    rank, world = accelerator.process_index, accelerator.num_processes
    objective.prepare_training(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    learning_rates = [objective.learning_rate_of(n, p) or cfg.learning_rate for n, p in named]
    masters = None
    if not sharded:
        # Replicated training places the model itself (no wrapper, see below); in bf16 mode the
        # optimizer then updates float32 masters of the parameters the model computes with.
        model.to(accelerator.device)
        if mode == "bf16":
            masters = precision.MasterWeights(model, params)
            params = masters.params
    # fused: one kernel per step over all parameters, no temporary copies of the moment buffers.
    groups: dict[float, list] = {}
    for p, lr in zip(params, learning_rates):
        groups.setdefault(lr, []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": lr} for lr, ps in groups.items()], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, fused=True)
    group_key = getattr(objective, "group_by", None)
    micro_per_epoch = len(epoch_batches(rows, cfg.batch_size, seed, 0, False, group_key))
    repeats = objective.updates_per_batch()  # consecutive steps on the same micro-batches (GRPO)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum) * repeats
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    # Replicated data parallelism without the DDP wrapper: the objectives call the model's decoder
    # and LM head separately (prompt sharing, the LM head at completion positions only), which a DDP
    # forward would bypass; the gradients are summed across processes after each step's backward
    # passes instead (all_reduce_gradients), the same sum DDP would compute.
    if sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    if isinstance(objective.ref_model, torch.nn.Module):
        objective.ref_model.to(accelerator.device)
        if not sharded:  # the reference computes like the policy at step 0
            precision.cast_for_compute(objective.ref_model, mode)
    model.train()
    if sharded:
        log.warning("train: %s shards the weights; resumable checkpoints are written for replicated (DDP) "
                    "training only, so this run restarts from step 0 if killed", accelerator.distributed_type.value)

    ckpt = resume_dir / "checkpoint"
    history: list[dict] = []
    step = 0
    if has_checkpoint(ckpt):
        progress = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, rank, masters)
        step, history = progress["step"], progress["history"]
        log.info("train: resumed from checkpoint at step %d/%d", step, total)

    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=None if rank == 0 else True)
    # Leaving the block, by the end or by an error, puts the float32 masters back into the model.
    with native_gqa(cfg.lean_layers and accelerator.device.type == "cpu"), masters or contextlib.nullcontext():
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            batches = epoch_batches(rows, cfg.batch_size, seed, epoch, cfg.group_by_length, group_key)
            at = in_epoch // repeats
            group = batches[at * cfg.grad_accum:(at + 1) * cfg.grad_accum]
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            loss_total, tokens = 0.0, 0.0
            for i, micro in enumerate(group):
                mine = shard(micro, rank, world, group_key)
                # A process left without rows computes the first unit at weight 0: every process
                # must take part in the same collectives (the weight total, the gradient sums).
                rows_here = mine or shard(micro, 0, len(micro), group_key)
                batch = {k: v.to(accelerator.device) for k, v in objective.collate(rows_here, tokenizer).items()}
                weights = batch["weights"] if mine else torch.zeros_like(batch["weights"])
                total_weight = weights.sum().detach().float()
                if world > 1:
                    total_weight = accelerator.reduce(total_weight, "sum")
                with accelerator.autocast(), idle(not mine):
                    per_example, metrics = objective.per_example_loss(model, batch)
                    loss = weighted_mean(per_example, weights, total_weight) / len(group)
                accelerator.backward(loss)
                if masters is not None:
                    masters.accumulate()  # summed in float32
                loss_total += loss.item()
                step_tokens = float(metrics.pop("tokens").sum())  # popped on idle processes too: same keys
                tokens += step_tokens if mine else 0.0
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(weighted_mean(v.detach().float(), weights, total_weight)) / len(group)
            if world > 1 and not sharded:
                all_reduce_gradients(params)
            if world > 1:  # each process holds its shards' parts of the step's sums
                keys = sorted(sums)
                parts = accelerator.reduce(torch.tensor([loss_total, tokens, *(sums[k] for k in keys)]), "sum").tolist()
                loss_total, tokens, sums = parts[0], parts[1], dict(zip(keys, parts[2:]))
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
            if not math.isfinite(loss_total) or (grad_norm is not None and not math.isfinite(grad_norm)):
                # Before the update: the weights (and the last checkpoint) stay finite.
                raise NonFiniteLoss(f"train: step {step + 1}/{total}: loss {loss_total}, gradient norm {grad_norm}; "
                                    f"nothing was committed (learning rate {cfg.learning_rate:g}: lower it, or check "
                                    "the records' weights and rewards)")
            optimizer.step()
            if masters is not None:
                masters.to_model()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            row = {"step": step, "epoch": epoch, "loss": loss_total, "learning_rate": scheduler.get_last_lr()[0],
                   "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / dt if dt else None, **sums}
            history.append(row)
            if cfg.log_with:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_total:.4f}")
            if rank == 0 and (step % max(1, total // 10) == 0 or step == total):  # the bar is hidden off a terminal
                log.info("train: step %d/%d loss %.4f, %.0f tokens/s", step, total, loss_total, row["tokens_per_s"] or 0)
            if step % cfg.checkpoint_every == 0 and step < total and not sharded:
                save_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, {"step": step, "history": history},
                                rank=rank, world=world, barrier=accelerator.wait_for_everyone, masters=masters)
    bar.close()
    objective.finish_training(accelerator.unwrap_model(model))
    if cfg.log_with:
        accelerator.end_training()
    if save_to is not None:
        # Sharded weights are gathered (every process takes part) for the main process to save.
        state_dict = accelerator.get_state_dict(model) if sharded else None
        if accelerator.is_main_process:
            final = accelerator.unwrap_model(model)
            if cfg.lora is not None:
                final = final.merge_and_unload()  # downstream stages load a plain model
            final.save_pretrained(save_to, state_dict=state_dict)
            tokenizer.save_pretrained(save_to)
        accelerator.wait_for_everyone()
    return history
