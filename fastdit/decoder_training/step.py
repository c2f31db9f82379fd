"""One step of RAE's decoder training: a decoder update, the EMA, then a discriminator update.

In the order of RAE's `train_stage1.py`:

1. the frozen encoder's tokens of the batch (no gradient), added to the latent statistics;
2. the decoder reads them noise-augmented (z + sigma eps, sigma ~ U(0, tau) per image) and its loss
   L1 + w_p LPIPS + w_g lambda L_G (`fastdit.decoder_training.losses`) is minimised by one AdamW step;
   the discriminator scores the fake in eval mode (spectral norm does no power iteration there);
3. the EMA of the decoder's weights;
4. from `disc_start`: the updated decoder decodes the clean tokens (no noise, no gradient), the fake is
   discretised to 8 bits, real and fake are DiffAug-ed, and the discriminator heads take one AdamW step
   on the hinge (or vanilla) loss; their gradients are averaged over the processes.

Every random draw is a function of (seed, step, global sample index) (`fastdit.seeding`): the token noise
and each sample's DiffAug parameters per sample, which DiffAug operations are on per step. So 1 and N
processes train on the same draws, and a resumed run draws what the uninterrupted one drew. The token
noise is drawn on the training device (196K normals per image for DINOv2-B at 256 px: per-sample CPU
draws would cost more than a step's GPU work); sigma, DiffAug and switches are drawn on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..precision import autocast
from ..rae.decoder import noise_augment
from ..seeding import DECODER_AUGMENT, DECODER_AUGMENT_SWITCHES, DECODER_NOISE, seeded_generator
from ..train.ema import update_ema
from ..train.step import StepResult
from .diffaug import diffaug
from .losses import (DISC_LOSSES, LossSchedule, adaptive_weight, cosine_lr, discretise, generator_loss, l1_loss)
from .state import DecoderTrainingState

# The DiffAug calls of a step: the fake the decoder's GAN loss scores, then the discriminator's fake and real.
AUG_CALLS = ("generator", "fake", "real")
# What a step reports (each the mean over the global batch), "loss" first: the decoder's total loss.
TERMS = ("loss", "l1", "lpips", "gan", "d_weight", "disc_loss", "disc_accuracy", "logits_real", "logits_fake")


@dataclass(frozen=True)
class StepSettings:
    """What a step needs beyond the state, resolved from the config once the epoch length is known."""

    seed: int
    global_batch: int
    local_batch: int
    rank: int
    device: torch.device
    precision: str
    noise_tau: float
    schedule: LossSchedule
    max_d_weight: float
    disc_loss: str
    diffaug_prob: float
    diffaug_cutout: float
    lr: float
    final_lr: float
    disc_lr: float
    disc_final_lr: float
    warmup_steps: int
    decay_end: int
    ema_decay: float
    grad_clip: float | None
    distributed: bool


@dataclass
class AugmentDraws:
    switches: torch.Tensor  # (3,) bool: translation, colour, cutout on for the batch
    uniforms: torch.Tensor  # (7, B) in [0, 1)


def augment_draws(settings: StepSettings, step: int) -> dict[str, AugmentDraws]:
    """This process's DiffAug draws of `step` for each call of AUG_CALLS."""
    first = settings.rank * settings.local_batch
    switches = torch.rand(len(AUG_CALLS), 3, generator=seeded_generator(DECODER_AUGMENT_SWITCHES, settings.seed, step))
    switches = switches <= settings.diffaug_prob if settings.diffaug_prob > 0 else torch.zeros(len(AUG_CALLS), 3, dtype=torch.bool)
    uniforms = torch.stack([torch.rand(len(AUG_CALLS), 7, generator=seeded_generator(DECODER_AUGMENT, settings.seed, step, g))
                            for g in range(first, first + settings.local_batch)], dim=-1)  # (calls, 7, B)
    return {name: AugmentDraws(switches[i], uniforms[i]) for i, name in enumerate(AUG_CALLS)}


def noisy_tokens(tokens: torch.Tensor, settings: StepSettings, step: int) -> torch.Tensor:
    """RAE's noise augmentation (`fastdit.rae.decoder.noise_augment`), each sample from its own generator."""
    if settings.noise_tau <= 0:
        return tokens
    first = settings.rank * settings.local_batch
    return torch.cat([
        noise_augment(tokens[i:i + 1], settings.noise_tau,
                      generator=seeded_generator(DECODER_NOISE, settings.seed, step, first + i, device=tokens.device))
        for i in range(len(tokens))])


def decoder_loss(runnable, last_layer: torch.Tensor, images: torch.Tensor, tokens: torch.Tensor, *, lpips, disc,
                 aug: AugmentDraws | None, use_lpips: bool, use_gan: bool, perceptual_weight: float,
                 disc_weight: float, max_d_weight: float, cutout: float, device: torch.device, precision: str,
                 average=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The decoder's loss on one batch (RAE's generator half) and its terms. `images` in [-1, 1];
    `tokens` what the decoder reads; `last_layer` the weight the adaptive weight differentiates."""
    zero = torch.zeros((), device=device)
    if disc is not None:
        disc.eval()  # as RAE: no power iteration of spectral norm in the decoder's half
    with autocast(device, precision):
        reconstruction = runnable(tokens)
        l1 = l1_loss(reconstruction, images)
        perceptual = lpips(images, reconstruction).mean() if use_lpips else zero
        reconstruction_loss = l1 + perceptual_weight * perceptual
        gan = generator_loss(disc(diffaug(reconstruction, aug.switches, aug.uniforms, cutout=cutout))) if use_gan else zero
    if use_gan:  # outside autocast, as RAE: gradients of two losses at one layer
        weight = adaptive_weight(reconstruction_loss, gan, last_layer, max_d_weight, average=average)
        total = reconstruction_loss + disc_weight * weight * gan
    else:
        weight, total = zero, reconstruction_loss
    return total, {"l1": l1.detach(), "lpips": perceptual.detach(), "gan": gan.detach(), "d_weight": weight}


def discriminator_loss(disc, fake: torch.Tensor, real: torch.Tensor, *, fake_aug: AugmentDraws, real_aug: AugmentDraws,
                       loss: str, cutout: float, device: torch.device, precision: str
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The discriminator's loss on a discretised fake and a real batch (RAE's discriminator half)."""
    disc.train()
    with autocast(device, precision):
        logits_fake = disc(diffaug(fake, fake_aug.switches, fake_aug.uniforms, cutout=cutout))  # fake first, as RAE
        logits_real = disc(diffaug(real, real_aug.switches, real_aug.uniforms, cutout=cutout))
        value = DISC_LOSSES[loss](logits_real, logits_fake)
    accuracy = (logits_real > logits_fake).float().mean()
    return value, {"disc_loss": value.detach(), "disc_accuracy": accuracy.detach(),
                   "logits_real": logits_real.detach().float().mean(), "logits_fake": logits_fake.detach().float().mean()}


def _average_gradients(parameters) -> None:
    """Average the gradients over the processes in one all-reduce (the discriminator heads are not
    DDP-wrapped: their two forwards a step run in training mode, which one DDP forward cannot hold)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = distributed.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(state: DecoderTrainingState, encoder, images: torch.Tensor, settings: StepSettings) -> StepResult:
    """One step at `state.position.step` (the caller advances the position) on this process's `images`."""
    step, device, schedule = state.position.step, settings.device, settings.schedule
    images = images.to(device, non_blocking=True)
    tokens = encoder(images)  # (B, D, g, g), frozen
    state.token_stats.add(tokens)
    draws = augment_draws(settings, step) if schedule.needs_disc else {}
    average = distributed.all_reduce_mean if settings.distributed else None

    # 1. the decoder
    _set_lr(state.optimizer, cosine_lr(step, base=settings.lr, final=settings.final_lr,
                                       warmup_steps=settings.warmup_steps, decay_end=settings.decay_end))
    state.optimizer.zero_grad(set_to_none=True)
    if state.disc is not None:
        state.disc.heads.requires_grad_(False)  # the decoder's loss passes through it; its heads are not trained here
    total, terms = decoder_loss(
        state.runnable, state.decoder.decoder_pred.weight, images, noisy_tokens(tokens, settings, step),
        lpips=state.lpips, disc=state.disc, aug=draws.get("generator"), use_lpips=schedule.uses_lpips(step),
        use_gan=schedule.uses_gan(step), perceptual_weight=schedule.perceptual_weight,
        disc_weight=schedule.disc_weight, max_d_weight=settings.max_d_weight, cutout=settings.diffaug_cutout,
        device=device, precision=settings.precision, average=average)
    total.backward()
    parameters = [p for p in state.decoder.parameters() if p.requires_grad]
    if settings.grad_clip is None:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
    state.optimizer.step()
    update_ema(state.ema, state.decoder, 1 - settings.ema_decay)
    terms = {"loss": total.detach(), **terms}

    # 2. the discriminator
    zero = torch.zeros((), device=device)
    disc_terms = {"disc_loss": zero, "disc_accuracy": zero, "logits_real": zero, "logits_fake": zero}
    if state.disc is not None and schedule.trains_disc(step):
        updates = step - schedule.disc_start  # the discriminator's schedule counts its own updates
        _set_lr(state.disc_optimizer, cosine_lr(updates, base=settings.disc_lr, final=settings.disc_final_lr,
                                                warmup_steps=settings.warmup_steps, decay_end=settings.decay_end))
        state.disc.heads.requires_grad_(True)
        state.disc_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad(), autocast(device, settings.precision):
            fake = discretise(state.decoder(tokens).float())  # the clean tokens: RAE's decoder in eval mode
        disc_value, disc_terms = discriminator_loss(
            state.disc, fake, images, fake_aug=draws["fake"], real_aug=draws["real"], loss=settings.disc_loss,
            cutout=settings.diffaug_cutout, device=device, precision=settings.precision)
        disc_value.backward()
        if settings.distributed:
            _average_gradients(state.disc.heads.parameters())
        state.disc_optimizer.step()
        state.disc.eval()
    terms.update(disc_terms)

    reported = torch.stack([terms[name].double() for name in TERMS])
    distributed.all_reduce_mean(reported)  # the global batch's means (equal shares per process)
    # From the global values, so that every process stops at the same step.
    bad = ~(torch.isfinite(reported).all() & torch.isfinite(grad_norm))
    state.nonfinite = bad if state.nonfinite is None else state.nonfinite | bad
    return StepResult(terms=dict(zip(TERMS, reported.unbind())), grad_norm=grad_norm.double(),
                      skipped=torch.zeros((), dtype=torch.bool, device=device))
