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
one-process gradient at the same global batch. The objective's forward runs inside one module
(`ObjectiveForward`) that accelerate wraps: DDP then all-reduces the gradients in buckets while
backward runs (once per optimizer step: the other micro-batches run under `no_sync`), and FSDP
gathers each layer's shards when the objective calls it. Both average over processes, so each
shard's loss is scaled by the number of processes to give the sum.
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
from stages.training.checkpoint import (has_checkpoint, has_sharded_checkpoint, load_checkpoint, load_sharded_checkpoint,
                                         save_checkpoint, save_sharded_checkpoint)
from stages.training.distributed_ops import idle
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


class ObjectiveForward(torch.nn.Module):
    """The objective's per-example loss as one module's forward, so that a data-parallel wrapper
    (DDP, FSDP) sees every use of the policy's parameters inside its own forward: the objectives
    call the decoder and the LM head separately (shared prompts, the head at completion positions
    only), which a wrapper around the policy alone would never see. The objective is a plain
    attribute: a resident reference model stays outside the wrapper."""

    def __init__(self, policy: torch.nn.Module, objective: Objective):
        super().__init__()
        self.policy = policy
        self.objective = objective
        # FSDP's transformer auto-wrap reads the layer classes from the wrapped module
        self._no_split_modules = getattr(policy, "_no_split_modules", None)

    def forward(self, batch: dict):
        return self.objective.per_example_loss(self.policy, batch)


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
    ddp = world > 1 and not sharded
    if not sharded:
        # In bf16 mode the optimizer updates float32 masters of the parameters the model computes
        # with. Under DDP, or with train.grad_sum_dtype bfloat16, the step's bf16 gradients are
        # summed on the model (DDP all-reduces them there) and go to float32 after its last backward.
        model.to(accelerator.device)
        if mode == "bf16":
            masters = precision.MasterWeights(model, params,
                                              fold_in_backward=not ddp and cfg.grad_sum_dtype == "float32")
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
    loss_module = ObjectiveForward(model, objective)
    if sharded:
        loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    elif ddp:
        loss_module = accelerator.prepare(loss_module)
    scale = world if (ddp or sharded) else 1  # the wrappers average the processes' gradients; we sum
    if isinstance(objective.ref_model, torch.nn.Module):
        objective.ref_model.to(accelerator.device)
        if not sharded:  # the reference computes like the policy at step 0
            precision.cast_for_compute(objective.ref_model, mode)
    model.train()
    if sharded:  # accelerate's save_state then holds the schedule too
        accelerator.register_for_checkpointing(scheduler)

    ckpt = resume_dir / "checkpoint"
    history: list[dict] = []
    step = 0
    if has_sharded_checkpoint(ckpt) if sharded else has_checkpoint(ckpt):
        progress = (load_sharded_checkpoint(ckpt, accelerator) if sharded else
                    load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, rank, masters))
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
                # DDP all-reduces once a step, with the last micro-batch's backward
                defer = accelerator.no_sync(loss_module) if ddp and i < len(group) - 1 else contextlib.nullcontext()
                with defer:
                    with accelerator.autocast(), idle(not mine):
                        per_example, metrics = loss_module(batch)
                        loss = weighted_mean(per_example, weights, total_weight) / len(group)
                    accelerator.backward(loss * scale if scale != 1 else loss)
                loss_total += loss.item()
                step_tokens = float(metrics.pop("tokens").sum())  # popped on idle processes too: same keys
                tokens += step_tokens if mine else 0.0
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(weighted_mean(v.detach().float(), weights, total_weight)) / len(group)
            if masters is not None:
                masters.accumulate()  # the step's gradients, in float32 for the optimizer
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
            if step % cfg.checkpoint_every == 0 and step < total:
                progress = {"step": step, "history": history}
                if sharded:
                    save_sharded_checkpoint(ckpt, accelerator, progress)
                else:
                    save_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, progress,
                                    rank=rank, world=world, barrier=accelerator.wait_for_everyone, masters=masters)
    bar.close()
    objective.finish_training(accelerator.unwrap_model(model))
    if cfg.log_with:
        accelerator.end_training()
    if save_to is not None:
        # Sharded weights are gathered (every process takes part) for the main process to save.
        state_dict = ({k.removeprefix("policy."): v for k, v in accelerator.get_state_dict(loss_module).items()}
                      if sharded else None)
        if accelerator.is_main_process:
            final = accelerator.unwrap_model(model)
            if cfg.lora is not None:
                final = final.merge_and_unload()  # downstream stages load a plain model
            final.save_pretrained(save_to, state_dict=state_dict)
            tokenizer.save_pretrained(save_to)
        accelerator.wait_for_everyone()
    return history
