"""The training loop: one readable function, the same for 1 CPU process and N GPUs on M nodes.

Launch with `python -m fastdit train ...` (one process), `torchrun --nproc_per_node N -m fastdit
train ...` (one node or many: add --nnodes/--node-rank/--rdzv-endpoint), or `accelerate launch -m
fastdit train ...`: each sets the same RANK/WORLD_SIZE/LOCAL_RANK variables, and DDP (or FSDP2, with --fsdp) does the rest.

Resume is the same command run again: the newest checkpoint in the run folder restores model,
optimizer, grad scaler, step, data position, RNG states and every training extension's state (the EMA,
a trained projector, ...: `TrainingState`). Every random draw of a step is a pure
function of (seed, step) and every item's augmentation of (seed, epoch, index), so a resumed run
trains on exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule

from .. import distributed
from ..checkpoint import export_weights
from ..model_info import ModelInfo
from ..errors import UserError
from ..host_memory import keep_freed_host_memory
from ..io import (
    NoSpaceError, atomic_write_text, check_can_create, check_regular_file, ensure_writable_dir, remove_stale_temporaries,
)
from ..models import build_model
from ..precision import precision_warning
from ..run_folder import exclusive_lock_for_all_ranks
from .config import RunSection, TrainConfig
from .data_record import compare_with_record, describe_data, read_data_record, write_data_record
from .data_order import StepBatchSampler, batch_split, steps_per_epoch
from .extensions import BuildContext, RunContext, build_extensions
from .init_from import load_initial_weights
from .logger import RunLogger, StepWindow
from .setup import enable_tf32, fsdp_mesh, make_grad_scaler, prepare_model, shard_model
from .state import (
    Position,
    StepLayout,
    TrainingState,
    checkpoint_dir,
    checkpoint_path,
    export_path,
    list_checkpoints,
    load_newest_for_all_ranks,
    save_training_state,
    set_rng_state,
)
from .step import NonFiniteLoss, non_finite_message, train_step
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
    if not os.path.lexists(path):
        return None
    check_regular_file(path, "run config")  # a named pipe would block the read; a folder is no config
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
    optim, run = config.optimisation, config.run
    _, micro_batch = batch_split(optim, dist.world_size)
    enable_tf32(device, run.tf32)
    objective = config.build_objective()
    data: TrainingData = open_training_data(config, device)  # the class count comes from the data when not given
    # Every check first: a bad command writes nothing, not even an empty run folder.
    _refuse_other_run(_stored_config(run_dir), config, run_dir)
    check_can_create(run_dir)
    data_record = describe_data(data.dataset)
    # Compared only once something was trained on the recorded data (a checkpoint exists).
    data_warning = compare_with_record(read_data_record(run_dir) if list_checkpoints(run_dir) else None,
                                       data_record, run_dir)
    per_epoch = steps_per_epoch(len(data.dataset), optim.global_batch_size)
    torch.manual_seed(optim.global_seed)  # the same initial weights on every process
    model = build_model(
        config.model.name, input_size=data.latent_shape[1], in_channels=data.latent_shape[0], **config.model_options()
    )
    initial = None
    if config.model.init_from and not list_checkpoints(run_dir):  # a resume takes everything from its checkpoint
        initial = load_initial_weights(model, config.model.init_from, config.model.image_size)
    model = model.to(device)
    model_info = ModelInfo(config=model.config, latent=data.latent_info, class_names=data.class_names,
                           objective=objective, sampling=config.sampling_recipe(tuple(data.latent_shape)))
    state = build_training_state(config, dist, model, data)

    # One run per folder: a second `train` on it stops here with a message instead of interleaving its
    # metrics and checkpoints with ours. Taken after the checks, so a bad command creates no folder.
    run_lock.enter_context(exclusive_lock_for_all_ranks(run_dir, "fastdit train", dist))
    if dist.is_main:  # what a killed save left (gigabytes for DiT-XL); no writer of this run is alive
        extension_folders = [folder for extension in state.extensions for folder in extension.folders(run_dir)]
        for folder in (run_dir, checkpoint_dir(run_dir), run_dir / "samples", *extension_folders):
            remove_stale_temporaries(folder)
    checkpoints, resume_warnings = list_checkpoints(run_dir), []
    if checkpoints:
        newest, stored, resume_warnings, from_rank0 = load_newest_for_all_ranks(checkpoints, dist,
                                                                                state.checkpoint_keys())
        checkpoints = checkpoints[: newest + 1]
        _refuse_other_run(TrainConfig.from_dict(stored["config"]), config, run_dir)
        state.load_state_dict(stored, from_rank0=from_rank0)
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
    if initial:
        log.info(initial)
    for warning in resume_warnings:
        log.info(warning)
    warning = precision_warning(device, run.precision)
    if warning:
        log.info(f"warning: {warning}")

    model.train()
    max_steps = optim.max_steps or optim.epochs * per_epoch
    num_params = sum(p.numel() for p in model.parameters())
    methods = "".join(f"{text}, " for text in (extension.describe() for extension in state.extensions) if text)
    log.info(
        f"{config.model.name} ({num_params:,} parameters), objective {objective.name}, on {len(data.dataset):,} items "
        f"of shape {tuple(data.latent_shape)}; {dist.world_size} process(es) on {device.type}{_parallelism(state)}, "
        f"global batch {optim.global_batch_size} (micro-batch {micro_batch}), {run.precision}, activation "
        f"checkpointing {run.gradient_checkpointing}{', blocks compiled' if run.compile else ''}, "
        f"{methods}steps {position.step} -> {max_steps}, run folder {run_dir}"
    )

    last_saved, last_loss = None, None
    window = StepWindow()  # the steps since the last log line
    outcomes = StepOutcomes(optim.skip_nonfinite, log, saved=lambda: bool(list_checkpoints(run_dir)))
    compile_checked = False
    run_context = RunContext(run_dir, dist, model_info, log, outcomes.settle)
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
            try:
                result = train_step(state, batch, objective)
            except torch.OutOfMemoryError:
                raise UserError(_out_of_memory(config, dist, data, position.step + 1)) from None
            if run.compile and not compile_checked:  # what the first step really ran compiled
                compile_checked = True
                log.info(_compile_report(model))
            outcomes.hold(position.step + 1, result)  # reads the step before: this one is queued already
            window.add(result)
            position.step += 1
            position.step_in_epoch += 1
            if progress is not None:
                progress.update(1)
            if _acts_at(config, position.step, max_steps):  # the loop acts on this step: its outcome first
                outcomes.settle()
            if position.step % run.log_every == 0 or position.step == max_steps:
                means = log.window(position.step, window, global_batch=optim.global_batch_size,
                                   lr=state.optimizer.param_groups[0]["lr"], epoch=position.epoch, device=device,
                                   progress=progress)
                last_loss = means.get("loss", last_loss)
            # Before the step's checkpoint: what an extension writes of this step (snapshots) must already be
            # there when a run resumed from that checkpoint does not pass the step again.
            for extension in state.extensions:
                extension.at_step_end(run_context, position.step, last=position.step == max_steps)
            if position.step == max_steps:
                outcomes.refuse_if_nothing_was_learned()
            if position.step % run.ckpt_every == 0 or position.step == max_steps:
                if position.step_in_epoch == per_epoch:  # store a finished epoch as the next one's start
                    position = state.position = Position(position.step, position.epoch + 1, 0)
                last_saved = _save(config, run_dir, dist, state, model_info, log)
            if run.sample_every and position.step % run.sample_every == 0:
                ema = state.gathered_ema()  # every process: FSDP gathers the EMA to rank 0
                problem = _sample_grid(config, objective, run_dir, ema, data, position.step, log) if dist.is_main else None
                problem = _from_main(problem)
                if problem is not None:  # the steps since the last checkpoint are saved before the run stops
                    if last_saved is None or last_saved != checkpoint_path(run_dir, position.step):
                        last_saved = _save(config, run_dir, dist, state, model_info, log)
                    raise UserError(f"the sample grid of step {position.step} failed ({problem}); the run stopped "
                                    f"after saving {last_saved.name}. Lower the learning rate or look at the "
                                    f"samples' settings (--sample-steps), then run the same command to resume")
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


def build_training_state(config: TrainConfig, dist: distributed.DistInfo, model, data: TrainingData) -> TrainingState:
    """The run's training extensions (built from the plain model: the EMA copies it, a projector is drawn
    right after it from the same seeded stream), then the model wrapped (checkpointing, compile, DDP or FSDP) and the
    extensions' averages sharded like it, then the optimizer over the wrapped parameters: the order FSDP
    needs."""
    run, optim = config.run, config.optimisation
    fsdp = run.fsdp and dist.is_distributed
    mesh = fsdp_mesh(dist, run.fsdp_shard_size) if fsdp else None
    extensions = build_extensions(BuildContext(config, model, dist, lambda module: make_optimizer(module, optim)))
    runnable = prepare_model(model, dist=dist, gradient_checkpointing=run.gradient_checkpointing,
                             compile_model=run.compile, fsdp=fsdp, precision=run.precision, mesh=mesh,
                             ddp_bucket_mb=run.ddp_bucket_mb, ddp_bf16_grads=run.ddp_bf16_grads)
    for extension in extensions:  # averages of the weights are sharded as the model is, in float32
        extension.shard((lambda module: shard_model(module, "fp32", mesh)) if fsdp else None)
    local_batch, micro_batch = batch_split(optim, dist.world_size)
    layout = StepLayout(rank=dist.rank, device=dist.device, local_batch=local_batch, micro_batch=micro_batch,
                        input_shape=tuple(data.latent_shape),
                        encode=data.latent_space.encode_moments if data.encode_on_the_fly else None)
    return TrainingState(model=model, runnable=runnable, optimizer=make_optimizer(model, optim),
                         scaler=make_grad_scaler(dist.device, run.precision), config=config, layout=layout,
                         extensions=extensions)


class StepOutcomes:
    """Whether each step was skipped for a non-finite loss or gradient, read on the host one step late
    (`hold`: while the next step runs) or when the loop acts on a step (`settle`: before it logs, saves
    or samples). Skipped steps are logged and counted in a row; one past `limit` (--skip-nonfinite)
    stops the run, before anything of that step is saved. `saved()`: whether a checkpoint exists, for
    the message."""

    def __init__(self, limit: int, log: RunLogger, saved=lambda: True):
        self.limit, self.log, self.saved = limit, log, saved
        self.pending, self.in_a_row = None, 0
        self.steps, self.updates = 0, 0  # of this run (this command), for `refuse_if_nothing_was_learned`

    def hold(self, number: int, result) -> None:
        """Keep step `number`'s result (counted from 1); settle the one held before."""
        self.settle()
        self.pending = (number, result)

    def settle(self) -> None:
        if self.pending is None:
            return
        (number, result), self.pending = self.pending, None
        self.steps += 1
        if not bool(result.skipped):  # waits for that step's all-reduce only
            self.in_a_row, self.updates = 0, self.updates + 1
            return
        self.in_a_row += 1
        if self.in_a_row > self.limit:  # the batch is not used up: a rerun retries it
            raise NonFiniteLoss(non_finite_message(result, number, saved=self.saved()))
        self.log.info(f"step {number:07d}  {result.problem()}: skipped, no update "
                      f"({self.in_a_row} in a row, --skip-nonfinite {self.limit})")


    def refuse_if_nothing_was_learned(self) -> None:
        """At the run's end: when every step it took was skipped, it saves nothing (its export would be the
        weights it started from, presented as the run's result)."""
        self.settle()
        if self.steps and not self.updates:
            raise NonFiniteLoss(
                f"every one of the {self.steps} steps this run took was skipped (not finite), so nothing was learned "
                f"and nothing is saved; lower --lr, add --grad-clip 1.0 or --warmup-steps, and check the data"
            )


def _out_of_memory(config: TrainConfig, dist, data: TrainingData, step: int) -> str:
    """The message of a run out of GPU memory: where, the estimate for this run, and the three levers."""
    from .memory import estimate_memory

    estimate = estimate_memory(config, dist.world_size, tuple(data.latent_shape))
    _, micro_batch = batch_split(config.optimisation, dist.world_size)
    levers = []
    if config.run.gradient_checkpointing != "blocks":
        levers.append("--gradient-checkpointing blocks (recompute activations in the backward)")
    if micro_batch > 1:
        levers.append(f"--micro-batch-size {max(1, micro_batch // 2)} (gradient accumulation: the same steps)")
    if config.run.precision == "fp32":
        levers.append("--precision bf16")
    return (f"out of memory on {dist.device} at step {step} (micro-batch {micro_batch} per process); this run needs "
            f"about {estimate.summary()} (`fastdit train ... --dry-run` itemises it). Lower it with "
            + ("; ".join(levers) or "more processes under --fsdp") + ", then run the same command to resume")


def _from_main(value):
    """`value` as the main process has it, on every process (a small picklable object)."""
    if not distributed.is_initialized():
        return value
    message = [value]
    torch.distributed.broadcast_object_list(message, src=0)
    return message[0]


def _acts_at(config: TrainConfig, step: int, max_steps: int) -> bool:
    """Whether the loop logs, saves, samples or evaluates after `step` (extensions settle on their own)."""
    run, every = config.run, config.evaluation.eval_every
    return (step == max_steps or step % run.log_every == 0 or step % run.ckpt_every == 0
            or bool(run.sample_every and step % run.sample_every == 0) or bool(every and step % every == 0))


def _compile_report(model) -> str:
    """One line on what torch.compile did in the first step: dynamo can decline blocks without an error
    (a block first met inside a functorch transform runs uncompiled for the rest of the run)."""
    stats = model.compile_stats
    if stats.calls == 0:
        return ("warning: --compile compiled nothing: no block ran compiled code in the first step (torch.compile "
                "declined every block), so the run trains eagerly")
    return (f"torch.compile: {stats.graphs} block graph(s) compiled; {stats.calls} block calls of the first step "
            f"ran compiled code")


def _parallelism(state: TrainingState) -> str:
    run = state.config.run
    if isinstance(state.model, FSDPModule):
        hybrid = run.fsdp_shard_size is not None and run.fsdp_shard_size < torch.distributed.get_world_size()
        how = f"HSDP: sharded within groups of {run.fsdp_shard_size} processes, replicated across them" if hybrid \
            else "FSDP2"
        return f" ({how}: parameters, gradients, optimizer state and EMA sharded)"
    if isinstance(state.runnable, torch.nn.parallel.DistributedDataParallel):
        default = RunSection()
        options = ([f"{run.ddp_bucket_mb} MiB buckets"] if run.ddp_bucket_mb != default.ddp_bucket_mb else []) + \
            (["bf16 gradient all-reduce"] if run.ddp_bf16_grads else [])
        return f" (DDP{': ' + ', '.join(options) if options else ''})"
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


def _sample_grid(config, objective, run_dir, ema, data, step, log) -> str | None:
    """Write the EMA's sample grid of `step`; a UserError (non-finite samples) is returned as its message."""
    try:
        _write_sample_grid(config, objective, run_dir, ema, data, step, log)
    except UserError as err:
        return str(err)
    return None


def _write_sample_grid(config, objective, run_dir, ema, data, step, log):
    from ..image_grid import make_grid
    from ..io import atomic_save_png
    from ..sampling import SamplingOptions, generate

    num_classes = config.model.num_classes
    labels = [k % num_classes for k in range(min(num_classes, 10) * 4)]
    cfg_scale = objective.sampling.cfg_scale(2.0, conditional=config.model.class_dropout_prob > 0)
    options = SamplingOptions(num_steps=config.run.sample_steps, cfg_scale=cfg_scale)
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
