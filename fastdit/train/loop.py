"""The training loop: one readable function, the same for 1 CPU process and N GPUs on M nodes.

Launch with `python -m fastdit train ...` (one process), `torchrun --nproc_per_node N -m fastdit
train ...` (one node or many: add --nnodes/--node-rank/--rdzv-endpoint), or `accelerate launch -m
fastdit train ...`: each sets the same RANK/WORLD_SIZE/LOCAL_RANK variables, and DDP (or FSDP2, with --fsdp) does the rest.

Resume is the same command run again: the newest checkpoint in the run folder restores model, EMA,
optimizer, grad scaler, step, data position and RNG states (`TrainingState`). Every random draw of a step is a pure
function of (seed, step) and every item's augmentation of (seed, epoch, index), so a resumed run
trains on exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.fsdp import FSDPModule

from .. import distributed
from ..checkpoint import export_weights
from ..model_info import ModelInfo
from ..errors import UserError
from ..host_memory import keep_freed_host_memory
from ..io import NoSpaceError, atomic_write_text, check_can_create, ensure_writable_dir, remove_stale_temporaries
from ..models import build_model
from ..precision import precision_warning
from ..run_folder import exclusive_lock_for_all_ranks
from .config import TrainConfig
from .data_record import compare_with_record, describe_data, read_data_record, write_data_record
from .data_order import StepBatchSampler, steps_per_epoch
from .ema import make_ema
from .routing import route_settings
from .logger import RunLogger, peak_memory_gb
from .posthoc_ema import PowerEMAs, save_snapshots, snapshot_folder
from .setup import enable_tf32, make_grad_scaler, prepare_model, shard_model
from .state import (
    Position,
    TrainingState,
    checkpoint_dir,
    checkpoint_path,
    export_path,
    list_checkpoints,
    load_newest_training_state,
    save_training_state,
    set_rng_state,
)
from .step import NonFiniteLoss, StepSettings, non_finite_message, train_step
from .training_data import TrainingData, open_training_data


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    export: Path | None
    step: int
    last_loss: float | None


def train(config: TrainConfig) -> TrainResult:
    config.validate()
    keep_freed_host_memory()
    dist = distributed.init_from_env(config.run.device)
    with contextlib.ExitStack() as run_lock:  # held from the first read of the run folder to the end
        result = _train(config, dist, run_lock)
    # On an error we leave without the closing barrier: the other processes may never reach it, and
    # torchrun stops the whole job when one process fails.
    distributed.shutdown()
    return result


def _stored_config(run_dir: Path) -> TrainConfig | None:
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} is not a readable run config ({err}); use another --run-name") from None


def _refuse_other_run(stored: TrainConfig | None, requested: TrainConfig, run_dir: Path) -> None:
    """A run folder continues only the run it holds: settings that define the run must match."""
    if stored is not None:
        stored.refuse_other_run(
            requested, f"the run folder {str(run_dir)!r} holds a run",
            "run the same command to resume it, or pass another --run-name / --results-dir for a new run",
        )


def _train(config: TrainConfig, dist: distributed.DistInfo, run_lock: contextlib.ExitStack) -> TrainResult:
    device = dist.device
    run_dir = config.run_dir()
    # Every check first: a bad command writes nothing, not even an empty run folder.
    _refuse_other_run(_stored_config(run_dir), config, run_dir)
    check_can_create(run_dir)
    optim, run = config.optimisation, config.run
    _, micro_batch = batch_split(config, dist.world_size)
    enable_tf32(device, run.tf32)

    objective = config.build_objective()
    data: TrainingData = open_training_data(config, device)
    data_record = describe_data(data.dataset)
    # Compared only once something was trained on the recorded data (a checkpoint exists).
    data_warning = compare_with_record(read_data_record(run_dir) if list_checkpoints(run_dir) else None,
                                       data_record, run_dir)
    per_epoch = steps_per_epoch(len(data.dataset), optim.global_batch_size)
    torch.manual_seed(optim.global_seed)  # the same initial weights on every process
    model = build_model(
        config.model.name, input_size=data.latent_shape[1], in_channels=data.latent_shape[0], **config.model_options()
    ).to(device)
    ema = make_ema(model)  # copied before any wrapping
    posthoc = PowerEMAs(model, optim.posthoc_sigma_rels) if optim.posthoc_ema else None
    model_info = ModelInfo(config=model.config, latent=data.latent_info, class_names=data.class_names,
                           objective=objective, sampling=config.sampling_recipe())
    state = build_training_state(config, dist, model, ema, data, posthoc=posthoc)

    # One run per folder: a second `train` on it stops here with a message instead of interleaving its
    # metrics and checkpoints with ours. Taken after the checks, so a bad command creates no folder.
    run_lock.enter_context(exclusive_lock_for_all_ranks(run_dir, "fastdit train", dist))
    if dist.is_main:  # what a killed save left (gigabytes for DiT-XL); no writer of this run is alive
        for folder in (run_dir, checkpoint_dir(run_dir), run_dir / "samples", snapshot_folder(run_dir)):
            remove_stale_temporaries(folder)
    checkpoints, resume_warnings = list_checkpoints(run_dir), []
    if checkpoints:
        newest, stored, resume_warnings = load_newest_training_state(checkpoints, is_main=dist.is_main)
        checkpoints = checkpoints[: newest + 1]
        _refuse_other_run(TrainConfig.from_dict(stored["config"]), config, run_dir)
        state.load_state_dict(stored)
        set_rng_state(stored["rng"])
        if dist.is_main and not export_path(checkpoints[-1]).exists():  # killed between the two writes
            export_weights(stored["ema"], model_info, export_path(checkpoints[-1]))
        del stored
    position = state.position
    if dist.is_main:
        ensure_writable_dir(run_dir)
        atomic_write_text(config.to_json() + "\n", run_dir / "config.json")
        write_data_record(run_dir, data_record)
    distributed.barrier()
    log = RunLogger(run_dir, enabled=dist.is_main, tensorboard=run.tensorboard, wandb=run.wandb,
                    config=config.to_flat(), start_step=position.step)
    if checkpoints:
        log.info(f"resuming from {checkpoints[-1]} (step {position.step})")
    if data_warning:
        log.info(f"warning: {data_warning}")
    for warning in resume_warnings:
        log.info(warning)
    warning = precision_warning(device, run.precision)
    if warning:
        log.info(f"warning: {warning}")

    model.train()
    max_steps = optim.max_steps or optim.epochs * per_epoch
    num_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"{config.model.name} ({num_params:,} parameters), objective {objective.name}, on {len(data.dataset):,} items "
        f"of shape {tuple(data.latent_shape)}; {dist.world_size} process(es) on {device.type}{_parallelism(state)}, "
        f"global batch {optim.global_batch_size} (micro-batch {micro_batch}), {run.precision}, activation "
        f"checkpointing {run.gradient_checkpointing}{', blocks compiled' if run.compile else ''}, "
        f"{_alignment_text(config, state)}{_routing_text(state)}{_posthoc_text(config, state)}"
        f"steps {position.step} -> {max_steps}, run folder {run_dir}"
    )

    last_saved, last_loss = None, None
    running, running_steps = None, 0  # the loss terms and gradient norm summed over the window's updates
    skipped_in_window, skipped_in_a_row = 0, 0  # steps skipped for a non-finite loss or gradient
    window_start = time.perf_counter()
    progress = _progress_bar(config, dist, position.step, max_steps)
    while position.step < max_steps:
        data.dataset.set_epoch(position.epoch)
        sampler = StepBatchSampler(len(data.dataset), optim.global_batch_size, dist.rank, dist.world_size,
                                   optim.global_seed, position.epoch, position.step_in_epoch)
        loader = torch.utils.data.DataLoader(
            data.dataset, batch_sampler=sampler, num_workers=config.data.num_workers,
            pin_memory=device.type == "cuda", persistent_workers=False,
        )
        for batch in loader:
            result = train_step(state, batch, objective)
            if result.skipped:
                skipped_in_a_row += 1
                if skipped_in_a_row > optim.skip_nonfinite:  # the batch is not used up: a rerun retries it
                    raise NonFiniteLoss(non_finite_message(result, position.step + 1))
                skipped_in_window += 1
                log.info(f"step {position.step + 1:07d}  {result.problem()}: skipped, no update "
                         f"({skipped_in_a_row} in a row, --skip-nonfinite {optim.skip_nonfinite})")
            else:
                skipped_in_a_row = 0
                update = {**result.terms, "grad_norm": result.grad_norm}
                running = update if running is None else {name: running[name] + value for name, value in update.items()}
                running_steps += 1
            position.step += 1
            position.step_in_epoch += 1
            if progress is not None:
                progress.update(1)
            if position.step % run.log_every == 0 or position.step == max_steps:
                # "loss", the objective's other terms ("mse", "vb", ...) and "grad_norm" (before clipping),
                # averaged over the window's updates; a window of skipped steps only has none.
                means = {name: (value / running_steps).item() for name, value in (running or {}).items()}
                last_loss = means.get("loss", last_loss)
                elapsed = time.perf_counter() - window_start
                window_steps = running_steps + skipped_in_window
                values = {  # the keys beside the terms are logger.STEP_STATISTICS
                    **means,  # "loss", the objective's other terms ("mse", "vb", ...) and "grad_norm"
                    "skipped_steps": skipped_in_window,
                    "steps_per_sec": window_steps / elapsed,
                    "images_per_sec": window_steps * optim.global_batch_size / elapsed,
                    "peak_memory_gb": peak_memory_gb(device),
                    "lr": state.optimizer.param_groups[0]["lr"],
                    "epoch": position.epoch,
                }
                log.metrics(position.step, values)
                others = {name: value for name, value in means.items() if name not in ("loss", "grad_norm")}
                terms_text = "".join(f" {name} {value:.4f}" for name, value in others.items())
                if progress is not None:
                    progress.set_postfix({name: f"{value:.4f}" for name, value in means.items()})
                elif means:
                    log.info(
                        f"step {position.step:07d}  loss {means['loss']:.4f}{' (' + terms_text.strip() + ')' if terms_text else ''}  "
                        f"grad norm {means['grad_norm']:.4f}  "
                        f"{values['steps_per_sec']:.2f} steps/s  {values['images_per_sec']:.1f} img/s  "
                        f"peak mem {values['peak_memory_gb']:.2f} GB"
                        + (f"  ({skipped_in_window} skipped)" if skipped_in_window else "")
                    )
                running, running_steps, skipped_in_window = None, 0, 0
                window_start = time.perf_counter()
            # Snapshots before the checkpoint of the same step: a run resumed from that checkpoint
            # does not pass this step again, so its snapshots must already be there.
            if state.posthoc is not None and (position.step % optim.posthoc_every == 0 or position.step == max_steps):
                _save_snapshots(run_dir, dist, state, model_info, log)
            if position.step % run.ckpt_every == 0 or position.step == max_steps:
                if position.step_in_epoch == per_epoch:  # store a finished epoch as the next one's start
                    position = state.position = Position(position.step, position.epoch + 1, 0)
                last_saved = _save(config, run_dir, dist, state, model_info, log)
            if run.sample_every and position.step % run.sample_every == 0:
                ema = state.gathered_ema()  # every process: FSDP gathers the EMA to rank 0
                if dist.is_main:
                    _sample_grid(config, objective, run_dir, ema, data, position.step, log)
            if config.evaluation.eval_every and position.step % config.evaluation.eval_every == 0:
                _evaluate(config, objective, state.ema, data, position.step, dist, log)
            if position.step >= max_steps:
                break
        if position.step_in_epoch >= per_epoch:
            position = state.position = Position(position.step, position.epoch + 1, 0)
    if progress is not None:
        progress.close()
    log.close()
    # A run resumed at its last step trains and saves nothing: its newest checkpoint is the result.
    checkpoint = last_saved or (checkpoints[-1] if checkpoints else None)
    export = export_path(checkpoint) if checkpoint else None
    return TrainResult(run_dir=run_dir, checkpoint=checkpoint, export=export, step=position.step, last_loss=last_loss)


def build_training_state(config: TrainConfig, dist: distributed.DistInfo, model, ema, data: TrainingData,
                         posthoc: PowerEMAs | None = None) -> TrainingState:
    """Wrap the model (checkpointing, compile, DDP or FSDP), shard the EMA (and the post-hoc EMAs) like
    it, then build the optimizer over the wrapped parameters: the order FSDP needs."""
    run, optim = config.run, config.optimisation
    fsdp = run.fsdp and dist.is_distributed
    runnable = prepare_model(model, dist=dist, gradient_checkpointing=run.gradient_checkpointing,
                             compile_model=run.compile, fsdp=fsdp, precision=run.precision)
    if fsdp:  # each process keeps the EMA of its own shard: the update needs no communication
        for average in [ema, *(posthoc.modules if posthoc is not None else [])]:
            shard_model(average, "fp32")
    local_batch, micro_batch = batch_split(config, dist.world_size)
    alignment = build_alignment(config, model, dist.device) if config.alignment.repa else None
    settings = StepSettings(
        seed=optim.global_seed, global_batch=optim.global_batch_size, local_batch=local_batch,
        micro_batch=micro_batch, rank=dist.rank, device=dist.device,
        input_shape=tuple(data.latent_shape), class_dropout_prob=config.model.class_dropout_prob,
        precision=run.precision, lr=optim.lr, warmup_steps=optim.warmup_steps, grad_clip=optim.grad_clip,
        ema_decay=optim.ema_decay, encode=data.latent_space.encode_moments if data.encode_on_the_fly else None,
        route=route_settings(config.routing.route, config.routing.route_blocks, model.config.depth,
                             model.config.grid_size**2),
    )
    return TrainingState(model=model, runnable=runnable, ema=ema, optimizer=make_optimizer(model, optim),
                         scaler=make_grad_scaler(dist.device, run.precision), settings=settings, alignment=alignment,
                         posthoc=posthoc)


def build_alignment(config: TrainConfig, model, device):
    """REPA's frozen encoder (`fastdit.encoders`) and a fresh projector from the DiT's width to the
    encoder's, with its own AdamW. Built after the DiT from the same seeded stream, so every process
    starts from the same projector."""
    from ..encoders import load_encoder
    from .alignment import Alignment, Projector

    settings = config.alignment
    encoder = load_encoder(settings.repa, device=device)
    projector = Projector(model.config.hidden_size, settings.repa_projector_dim, encoder.dim).to(device)
    return Alignment(encoder, projector, settings.repa_depth, settings.repa_weight,
                     optimizer=make_optimizer(projector, config.optimisation))


def batch_split(config: TrainConfig, world_size: int) -> tuple[int, int]:
    """(images per process, images per forward) of a step; a UserError if they do not divide."""
    optim = config.optimisation
    if optim.global_batch_size % world_size:
        raise UserError(
            f"global batch size {optim.global_batch_size} is not divisible by the {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    local_batch = optim.global_batch_size // world_size
    micro_batch = optim.micro_batch_size or local_batch
    if local_batch % micro_batch:
        raise UserError(f"--micro-batch-size {micro_batch} does not divide the per-process batch {local_batch}")
    return local_batch, micro_batch


def _alignment_text(config: TrainConfig, state: TrainingState) -> str:
    settings = config.alignment
    if state.alignment is None:
        return ""
    return f"REPA with {settings.repa} at block {settings.repa_depth} (weight {settings.repa_weight:g}), "


def _posthoc_text(config: TrainConfig, state: TrainingState) -> str:
    optim = config.optimisation
    if state.posthoc is None:
        return ""
    lengths = " and ".join(f"{s:g}" for s in optim.posthoc_sigma_rels)
    return f"post-hoc EMAs σ_rel {lengths} (snapshots every {optim.posthoc_every} steps), "


def _routing_text(state: TrainingState) -> str:
    route = state.settings.route
    if route is None:
        return ""
    return (f"token routing: blocks[{route.start}:{route.end}] see {route.num_kept} of {route.num_tokens} tokens "
            f"per sample, ")


def _parallelism(state: TrainingState) -> str:
    if isinstance(state.model, FSDPModule):
        return " (FSDP2: parameters, gradients, optimizer state and EMA sharded)"
    if isinstance(state.runnable, torch.nn.parallel.DistributedDataParallel):
        return " (DDP)"
    return ""


def make_optimizer(model: torch.nn.Module, optim) -> torch.optim.AdamW:
    # The fused kernel updates every tensor in one pass: the default per-tensor loop costs more
    # than a whole forward pass of small models on a CPU.
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay, fused=True,
    )


def _save(config, run_dir, dist, state: TrainingState, model_info, log):
    path, position = None, state.position
    content = state.state_dict()  # every process: FSDP gathers the shards to rank 0
    if dist.is_main:
        try:
            path = save_training_state(run_dir, content, config=config.to_dict(), model_info=model_info,
                                       keep_last=config.run.keep_last)
        except (NoSpaceError, OSError) as err:
            previous = list_checkpoints(run_dir)
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            problem = f"{err.reason}, {err.free}" if isinstance(err, NoSpaceError) else err.strerror or err
            raise UserError(
                f"could not save the checkpoint of step {position.step} in {run_dir} ({problem}); {kept}. "
                f"Free disk space or choose another --results-dir, then run the same command to resume"
            ) from None
        log.info(f"saved {path}")
    distributed.barrier()
    return path if path is not None else checkpoint_path(run_dir, position.step)


def _save_snapshots(run_dir, dist, state: TrainingState, model_info, log):
    """The post-hoc EMAs' snapshots of this step (gathered from every process under FSDP; rank 0 writes)."""
    states = state.posthoc.state_dict(StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_main:
        paths = save_snapshots(run_dir, states, state.posthoc, state.position.step, model_info)
        log.info(f"saved post-hoc EMA snapshots {', '.join(p.name for p in paths)}")
    distributed.barrier()


def _sample_grid(config, objective, run_dir, ema, data, step, log):
    from ..image_grid import make_grid
    from ..io import atomic_save_png
    from ..sampling import SamplingOptions, generate

    num_classes = config.model.num_classes
    labels = [k % num_classes for k in range(min(num_classes, 10) * 4)]
    guided = config.model.class_dropout_prob > 0 and objective.trained_guidance is None  # else trained in
    options = SamplingOptions(num_steps=config.run.sample_steps, cfg_scale=2.0 if guided else 1.0)
    images = generate(ema, data.decoder(), labels, options=options, objective=objective,
                      seed=config.optimisation.global_seed, device=next(ema.parameters()).device)
    grid = make_grid(images, nrow=min(num_classes, 10))
    atomic_save_png(grid, run_dir / "samples" / f"{step:07d}.png")
    log.image(step, "samples/ema", np.asarray(grid.convert("RGB")))


def _evaluate(config, objective, ema, data, step, dist, log):
    from .evaluation import fid_of_model

    metrics = fid_of_model(config, objective, ema, data, dist)
    if metrics is not None:
        log.metrics(step, {f"eval/{k}": v for k, v in metrics.items()})
        log.info(f"step {step:07d}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def _progress_bar(config, dist, start, total):
    if not (config.run.progress and dist.is_main):
        return None
    from ..progress import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)


__all__ = ["NonFiniteLoss", "TrainResult", "train"]
