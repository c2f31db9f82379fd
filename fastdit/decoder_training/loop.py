"""The decoder-training loop: one readable function, the same for 1 CPU process and N GPUs on M nodes.

Launch with `python -m fastdit train-decoder ...` (one process) or `torchrun --nproc_per_node N -m fastdit
train-decoder ...`: DDP replicates the decoder, the discriminator heads average their gradients
themselves (`fastdit.decoder_training.step`). The run folder, its lock, checkpoints and their exports,
resume, the data order, the logger and the systems options are those of `fastdit train`
(`fastdit.train`): resume is the same command run again, and the newest checkpoint restores the
decoder, its EMA, both optimizers, the discriminator, the position, the latent statistics and the RNG
states; every draw is a function of (seed, step, sample), so a resumed run trains on exactly what an
uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed
from ..errors import UserError
from ..host_memory import keep_freed_host_memory
from ..io import (NoSpaceError, atomic_write_json, atomic_write_text, check_can_create, check_regular_file,
                  ensure_writable_dir, remove_stale_temporaries)
from ..precision import precision_warning
from ..rae.decoder import RAEDecoder, RAEDecoderConfig, decoder_config, output_normalisation
from ..run_folder import exclusive_lock_for_all_ranks
from ..train.data_order import StepBatchSampler, steps_per_epoch
from ..train.ema import make_ema
from ..train.logger import RunLogger, StepWindow
from ..train.setup import enable_tf32, prepare_model
from ..train.state import (Position, checkpoint_dir, checkpoint_path, export_path, list_checkpoints,
                           load_newest_training_state, rng_state, save_checkpoint_pair, set_rng_state)
from .config import DecoderTrainConfig
from .data import open_images
from .encoder import TokenEncoder, load_token_encoder
from .evaluation import ReconstructionEvaluator, check_eval_size
from .export import copy_encoder, export_decoder, write_rae_description, write_statistics
from .losses import LossSchedule
from .state import DECODER_TRAIN_FORMAT, DecoderTrainingState, TokenStatistics, load_decoder_checkpoint
from .step import StepSettings, train_step

DATA_RECORD = "data.json"


@dataclass
class DecoderTrainResult:
    run_dir: Path
    checkpoint: Path | None
    export: Path | None
    step: int
    metrics: dict | None  # the last rFID / PSNR, when --eval-data was given


def train_decoder(config: DecoderTrainConfig) -> DecoderTrainResult:
    config.validate()
    keep_freed_host_memory()
    dist = distributed.init_from_env(config.run.device)
    with contextlib.ExitStack() as run_lock:  # held from the first read of the run folder to the end
        result = _train(config, dist, run_lock)
    distributed.shutdown()
    return result


def build_decoder_config(config: DecoderTrainConfig, encoder: TokenEncoder, channels: int) -> RAEDecoderConfig:
    """The decoder for `encoder`'s tokens at --image-size: RAE's preset with the flags' overrides, its patch
    the image side over the token grid."""
    section, size = config.decoder, config.decoder.image_size
    if size % encoder.grid:
        raise UserError(f"--image-size {size} is not a multiple of the encoder's {encoder.grid}x{encoder.grid} token "
                        f"grid; the decoder turns each token into a square patch: use a multiple of {encoder.grid}, "
                        f"e.g. {encoder.grid * max(1, round(size / encoder.grid))}")
    overrides = {name: getattr(section, f"decoder_{name}") for name in ("depth", "hidden_size", "num_heads", "mlp_size")
                 if getattr(section, f"decoder_{name}") is not None}
    try:  # the output normalisation RAE undoes: ImageNet's; a gray decoder's the channels' average
        return decoder_config(section.decoder, latent_dim=encoder.dim, grid_size=encoder.grid,
                              patch_size=size // encoder.grid, channels=channels, **output_normalisation(channels),
                              **overrides)
    except ValueError as err:
        raise UserError(f"the decoder's shape does not work: {err}; change --decoder-hidden-size / "
                        "--decoder-num-heads") from None


def _stored_config(run_dir: Path) -> DecoderTrainConfig | None:
    path = run_dir / "config.json"
    if not os.path.lexists(path):
        return None
    check_regular_file(path, "run config")
    try:
        return DecoderTrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise UserError(f"{path} is not a readable decoder-training run config ({err}); use another --run-name") from None


def _refuse_other_run(stored: DecoderTrainConfig | None, requested: DecoderTrainConfig, run_dir: Path) -> None:
    if stored is not None:
        stored.refuse_other_run(requested, f"the run folder {str(run_dir)!r} holds a decoder-training run",
                                "run the same command to resume it, or pass another --run-name / --results-dir")


def _local_batch(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise UserError(f"global batch size {global_batch} is not divisible by the {world_size} processes; use a "
                        f"multiple of {world_size}")
    return global_batch // world_size


def _train(config: DecoderTrainConfig, dist: distributed.DistInfo, run_lock: contextlib.ExitStack) -> DecoderTrainResult:
    device, run, optim, losses = dist.device, config.run, config.optimisation, config.loss
    run_dir = config.run_dir()
    local_batch = _local_batch(optim.global_batch_size, dist.world_size)
    enable_tf32(device, run.tf32)
    outputs = {run.results_dir: "--results-dir", str(run_dir): "run folder (--run-name)"}
    dataset = open_images(config.data.data_path, config.decoder.image_size, train=True, seed=optim.global_seed,
                          exclude=outputs)
    per_epoch = steps_per_epoch(len(dataset), optim.global_batch_size)
    evaluation = config.evaluation
    eval_set = None
    if evaluation.eval_data:
        eval_set = open_images(evaluation.eval_data, config.decoder.image_size, train=False, seed=optim.global_seed,
                               limit=evaluation.eval_images, exclude=outputs)
        check_eval_size(len(eval_set), evaluation.eval_data)
    # Every check first: a bad command writes nothing, not even an empty run folder.
    _refuse_other_run(_stored_config(run_dir), config, run_dir)
    check_can_create(run_dir)
    encoder = load_token_encoder(config.decoder.encoder, device, resolution=config.decoder.encoder_resolution,
                                 progress=dist.is_main)
    architecture = build_decoder_config(config, encoder, dataset.channels)
    state = _build_state(config, dist, architecture, encoder)
    schedule = LossSchedule.from_epochs(
        per_epoch, lpips_start=losses.lpips_start_epoch, disc_start=losses.disc_start_epoch,
        gan_start=losses.gan_start_epoch, perceptual_weight=losses.perceptual_weight, disc_weight=losses.disc_weight)
    settings = StepSettings(
        seed=optim.global_seed, global_batch=optim.global_batch_size, local_batch=local_batch, rank=dist.rank,
        device=device, precision=run.precision, noise_tau=config.decoder.noise_tau, schedule=schedule,
        max_d_weight=losses.max_d_weight, disc_loss=losses.disc_loss, diffaug_prob=losses.diffaug_prob,
        diffaug_cutout=losses.diffaug_cutout, lr=optim.lr, final_lr=optim.final_lr, disc_lr=optim.disc_lr,
        disc_final_lr=optim.disc_final_lr, warmup_steps=int(optim.warmup_epochs * per_epoch),
        decay_end=int(optim.epochs * per_epoch), ema_decay=optim.ema_decay, grad_clip=optim.grad_clip,
        distributed=dist.is_distributed)

    # One run per folder; taken after the checks, so a bad command creates no folder.
    run_lock.enter_context(exclusive_lock_for_all_ranks(run_dir, "fastdit train-decoder", dist))
    if dist.is_main:
        for folder in (run_dir, checkpoint_dir(run_dir)):
            remove_stale_temporaries(folder)
    checkpoints, resume_warnings = list_checkpoints(run_dir), []
    if checkpoints:
        newest, stored, resume_warnings = load_newest_training_state(checkpoints, is_main=dist.is_main,
                                                                     load=load_decoder_checkpoint)
        checkpoints = checkpoints[: newest + 1]
        _refuse_other_run(DecoderTrainConfig.from_dict(stored["config"]), config, run_dir)
        if stored["encoder"] != encoder.identity:
            raise UserError(f"the run in {str(run_dir)!r} trained on the tokens of {stored['encoder']}, this encoder "
                            f"makes {encoder.identity}; resume with the run's encoder, or pass another --run-name")
        state.load_state_dict(stored, is_main=dist.is_main)
        set_rng_state(stored["rng"])
        if dist.is_main and not export_path(checkpoints[-1]).exists():  # killed between the two writes
            _export(stored["ema"], export_path(checkpoints[-1]), architecture, encoder, state.position.step)
        del stored
    position, data_warning = state.position, None
    if dist.is_main:
        record = {"num_items": len(dataset), "files_digest": dataset.digest}
        data_warning = _compare_data(run_dir, record) if checkpoints else None
        ensure_writable_dir(run_dir)
        atomic_write_text(config.to_json() + "\n", run_dir / "config.json")
        if os.path.lexists(run_dir / DATA_RECORD):
            check_regular_file(run_dir / DATA_RECORD, "data record")
        atomic_write_json(record, run_dir / DATA_RECORD)
    distributed.barrier()
    log = RunLogger(run_dir, enabled=dist.is_main, tensorboard=run.tensorboard, wandb=False, config=config.to_flat(),
                    start_step=position.step)
    for line in ([f"resuming from {checkpoints[-1]} (step {position.step})"] if checkpoints else []) + resume_warnings:
        log.info(line)
    if data_warning:
        log.info(f"warning: {data_warning}")
    warning = precision_warning(device, run.precision)
    if warning:
        log.info(f"warning: {warning}")

    max_steps = min(optim.max_steps or 10**18, int(optim.epochs * per_epoch))
    log.info(_describe(config, state, encoder, architecture, dataset, dist, schedule, per_epoch, max_steps, run_dir))
    evaluator = None
    if eval_set is not None:
        evaluator = ReconstructionEvaluator(eval_set, dist=dist, batch_size=evaluation.eval_batch_size,
                                            precision=run.precision, inception_weights=evaluation.inception_weights)

    last_saved, metrics, trained = None, None, False
    window = StepWindow()
    progress = _progress_bar(config, dist, position.step, max_steps)
    while position.step < max_steps:
        dataset.set_epoch(position.epoch)
        sampler = StepBatchSampler(len(dataset), optim.global_batch_size, dist.rank, dist.world_size,
                                   optim.global_seed, position.epoch, position.step_in_epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.data.num_workers,
                                             pin_memory=device.type == "cuda", persistent_workers=False)
        for images in loader:
            result = train_step(state, encoder, images, settings)
            window.add(result)
            trained = True
            position.step += 1
            position.step_in_epoch += 1
            if progress is not None:
                progress.update(1)
            last = position.step == max_steps
            if position.step % run.log_every == 0 or last:
                _refuse_non_finite(state, position.step, checkpoints, last_saved)
                log.window(position.step, window, global_batch=optim.global_batch_size,
                           lr=state.optimizer.param_groups[0]["lr"], epoch=position.epoch, device=device,
                           progress=progress)
            if position.step % run.ckpt_every == 0 or last:
                _refuse_non_finite(state, position.step, checkpoints, last_saved)
                if position.step_in_epoch == per_epoch:  # store a finished epoch as the next one's start
                    position = state.position = Position(position.step, position.epoch + 1, 0)
                last_saved = _save(config, run_dir, dist, state, architecture, encoder, log)
            if evaluator is not None and (last or (evaluation.eval_every and position.step % evaluation.eval_every == 0)):
                metrics = _evaluate(evaluator, state, encoder, position.step, log)
            if position.step >= max_steps:
                break
        if position.step_in_epoch >= per_epoch:
            position = state.position = Position(position.step, position.epoch + 1, 0)
    if progress is not None:
        progress.close()
    if evaluator is not None and not trained and dist.is_main:
        log.info("the run was complete already: nothing trained, nothing evaluated")
    log.close()
    checkpoint = last_saved or (checkpoints[-1] if checkpoints else None)
    return DecoderTrainResult(run_dir=run_dir, checkpoint=checkpoint,
                              export=export_path(checkpoint) if checkpoint else None, step=position.step,
                              metrics=metrics)


def _build_state(config: DecoderTrainConfig, dist, architecture: RAEDecoderConfig, encoder: TokenEncoder):
    """The decoder, its EMA, the discriminator and LPIPS (frozen parts fetched first: an offline machine
    learns at once), the decoder wrapped as asked (checkpointing, compile, DDP), then the optimizers."""
    run, optim, losses, device = config.run, config.optimisation, config.loss, dist.device
    lpips = None
    if losses.perceptual_weight > 0:
        from .lpips import load_lpips

        lpips = load_lpips(progress=dist.is_main).to(device)
    backbone = None
    if losses.disc_weight > 0:
        from .discriminator import DINO_DISC_FILE, DINO_DISC_SUBDIR, DINO_DISC_URL, DinoBackbone, load_dino_state
        from .weights import fetch

        backbone = DinoBackbone(losses.disc_input_size)
        load_dino_state(backbone, fetch(DINO_DISC_URL, DINO_DISC_FILE, DINO_DISC_SUBDIR, progress=dist.is_main))
    torch.manual_seed(optim.global_seed)  # the same initial weights on every process: decoder, then heads
    decoder = RAEDecoder(architecture)
    disc = None
    if backbone is not None:
        from .discriminator import Discriminator, DiscriminatorHeads

        disc = Discriminator(backbone, DiscriminatorHeads(losses.disc_kernel_size)).to(device).eval()
    decoder = decoder.to(device)
    ema = make_ema(decoder)
    runnable = prepare_model(decoder, dist=dist, gradient_checkpointing=run.gradient_checkpointing,
                             compile_model=run.compile, precision=run.precision)

    def adamw(parameters, lr):  # RAE's build_optimizer: AdamW, eps 1e-8, fused
        return torch.optim.AdamW(parameters, lr=lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay,
                                 fused=True)

    optimizer = adamw([p for p in decoder.parameters() if p.requires_grad], optim.lr)
    disc_optimizer = adamw(list(disc.heads.parameters()), optim.disc_lr) if disc is not None else None
    stats = TokenStatistics((encoder.dim, encoder.grid, encoder.grid), device)
    return DecoderTrainingState(decoder=decoder, runnable=runnable, ema=ema, optimizer=optimizer, token_stats=stats,
                                disc=disc, disc_optimizer=disc_optimizer, lpips=lpips)


def _refuse_non_finite(state: DecoderTrainingState, step: int, checkpoints, last_saved) -> None:
    if state.nonfinite is not None and bool(state.nonfinite):
        kept = last_saved or (checkpoints[-1] if checkpoints else None)
        where = f"the last good checkpoint {kept} is intact" if kept else "no checkpoint was written yet"
        raise UserError(f"the loss or the gradient became non-finite by step {step}; stopping ({where}). Try a lower "
                        "--lr, --grad-clip 1.0, or --precision fp32, then run the same command to resume")


def _export(ema_state: dict, path: Path, architecture, encoder: TokenEncoder, step: int) -> None:
    export_decoder(ema_state, path, decoder_config=architecture, encoder=encoder.identity, step=step)


def _save(config, run_dir: Path, dist, state: DecoderTrainingState, architecture, encoder: TokenEncoder, log) -> Path:
    """The checkpoint and its export, then the latent statistics and (RAE encoders) rae.json naming them."""
    position = state.position
    content = state.state_dict()  # every process: the statistics are summed over them
    path = checkpoint_path(run_dir, position.step)
    if dist.is_main:
        content.update(format=DECODER_TRAIN_FORMAT, version=1, rng=rng_state(), config=config.to_dict(),
                       encoder=encoder.identity)
        try:
            save_checkpoint_pair(run_dir, path, content,
                                 lambda target: _export(content["ema"], target, architecture, encoder, position.step),
                                 keep_last=config.run.keep_last)
            mean, var = TokenStatistics.mean_var(content["token_stats"])
            write_statistics(run_dir, mean, var)
            if encoder.is_rae or encoder.torchscript_file is not None:
                name = encoder.rae_encoder if encoder.is_rae else copy_encoder(encoder.torchscript_file, run_dir)
                write_rae_description(run_dir, export_path(path), encoder=name, encoder_input_size=encoder.input_size,
                                      decoder_config=architecture)
        except (NoSpaceError, OSError) as err:
            previous = list_checkpoints(run_dir)
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            problem = f"{err.reason}, {err.free}" if isinstance(err, NoSpaceError) else err.strerror or err
            raise UserError(f"could not save the checkpoint of step {position.step} in {run_dir} ({problem}); {kept}. "
                            "Free disk space or choose another --results-dir, then run the same command to resume") from None
        log.info(f"saved {path}")
    distributed.barrier()
    return path


def _evaluate(evaluator: ReconstructionEvaluator, state: DecoderTrainingState, encoder, step: int, log):
    metrics = evaluator.evaluate(state.ema, encoder)
    if metrics is not None:
        log.metrics(step, {"eval/rfid": metrics["rfid"], "eval/psnr": metrics["psnr"]})
        log.info(f"step {step:07d}  rFID {metrics['rfid']:.3f}  PSNR {metrics['psnr']:.2f} dB "
                 f"({metrics['images']} held-out images, EMA decoder)")
    return metrics


def _compare_data(run_dir: Path, record: dict) -> str | None:
    """A warning when the training images changed since the run's last start (`data.json`: their count and a
    digest of their paths and sizes): the data order follows the count. Labels mean nothing to a decoder,
    so only the files are compared."""
    try:
        recorded = json.loads((run_dir / DATA_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(recorded, dict) and recorded.get("files_digest") != record["files_digest"]:
        return (f"the training images changed since the last start of this run ({recorded.get('num_items')} -> "
                f"{record['num_items']} images): training continues, on another data order than an uninterrupted "
                "run would have seen")
    return None


def _describe(config, state, encoder, architecture, dataset, dist, schedule: LossSchedule, per_epoch, max_steps,
              run_dir) -> str:
    decoder_params = sum(p.numel() for p in state.decoder.parameters() if p.requires_grad)
    parts = [f"RAE decoder {config.decoder.decoder} ({decoder_params:,} parameters; {architecture.grid_size}x"
             f"{architecture.grid_size} tokens {architecture.latent_dim} wide -> {architecture.image_size} px, patch "
             f"{architecture.patch_size}) for {encoder.name}",
             f"{len(dataset):,} images, {per_epoch} steps per epoch",
             f"{dist.world_size} process(es) on {dist.device.type}, global batch {config.optimisation.global_batch_size}, "
             f"{config.run.precision}",
             f"L1 + {schedule.perceptual_weight:g} LPIPS from step {schedule.lpips_start}" if schedule.needs_lpips else "L1",
             (f"discriminator from step {schedule.disc_start}, GAN loss (weight {schedule.disc_weight:g} x adaptive) from "
              f"step {schedule.gan_start}") if schedule.needs_disc else "no GAN",
             f"steps {state.position.step} -> {max_steps}, run folder {run_dir}"]
    return "; ".join(parts)


def _progress_bar(config, dist, start, total):
    if not (config.run.progress and dist.is_main):
        return None
    from ..progress import tqdm

    return tqdm(total=total, initial=start, desc="training the decoder", unit="step", dynamic_ncols=True)
