"""The losses of RAE's decoder training and when each one is on (RAE's `src/train_stage1.py`).

The decoder D maps noise-augmented encoder tokens z + sigma eps to an image x_hat; its loss is VQGAN's
(Esser, Rombach & Ommer 2021, eq. 7):

    L_D = L1(x_hat, x) + w_p LPIPS(x_hat, x) + w_g lambda(x_hat) L_G(x_hat),

* L1 is the mean absolute error in RAE's pixel range [0, 1]: half of it in fastdit's [-1, 1];
* L_G = -mean(logits of the augmented fake), the non-saturating "vanilla" generator loss;
* lambda, the adaptive weight (VQGAN eq. 7), balances the two gradients at the decoder's last layer W:
  lambda = |grad_W (L1 + w_p LPIPS)| / (|grad_W L_G| + 1e-6), clipped to [0, max_d_weight], not
  differentiated. Under several processes the two gradients are those of the global batch's mean loss
  (each process's all-reduced): RAE takes each GPU's own, so its weight depends on the GPU count.

The discriminator trains against real and (discretised, not noise-augmented) fake images, both
DiffAug-ed: the hinge loss 0.5 (mean relu(1 - real) + mean relu(1 + fake)) (Lim & Ye 2017) or the
"vanilla" 0.5 (mean softplus(-real) + mean softplus(fake)).

Schedule (RAE's DINOv2-B_decXL.yaml, in epochs): LPIPS from `lpips_start` (0), discriminator updates
from `disc_start` (6), the GAN term in the decoder's loss from `gan_start` (8), 16 epochs in all. The
learning rates follow a cosine from `lr` to `final_lr` after a linear warm-up from zero over the first
epoch (RAE's `build_scheduler`, type cosine, warmup_from_zero); the discriminator's schedule counts its
own updates, from its first one (RAE steps its scheduler only when it updates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ADAPTIVE_EPS = 1e-6


def l1_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """mean |x_hat - x| in [0, 1] units for images in [-1, 1] (RAE's `(recon - images).abs().mean()`)."""
    return 0.5 * (reconstruction - images).abs().mean()


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss on raw logits (RAE's `vanilla_g_loss`)."""
    return -logits_fake.mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def discretise(images: torch.Tensor) -> torch.Tensor:
    """What the fake would be as an 8-bit image: clamped to [-1, 1] and rounded to 255 levels (RAE feeds
    the discriminator fakes as it would see saved images, so it cannot tell them from the reals by
    sub-level detail)."""
    return torch.round((images.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def adaptive_weight(reconstruction_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float, *, average=None) -> torch.Tensor:
    """VQGAN's lambda (module docstring), computed outside autocast. `average`: a function that averages a
    tensor over the processes in place (the global batch's gradient), or None for one process."""
    grad_rec = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    grad_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    if average is not None:
        grad_rec, grad_gan = average(grad_rec.clone()), average(grad_gan.clone())
    weight = torch.norm(grad_rec) / (torch.norm(grad_gan) + ADAPTIVE_EPS)
    return torch.clamp(weight, 0.0, max_weight).detach()


def cosine_lr(step: int, *, base: float, final: float, warmup_steps: int, decay_end: int) -> float:
    """RAE's cosine schedule (`build_scheduler`, warmup_from_zero): base (k + 1) / W during the first W
    steps, then from base down to final along a half cosine until `decay_end`, then final. Written as RAE's
    LambdaLR computes it (base times a ratio), so the rates are RAE's to the last bit."""
    decay_end = max(decay_end, warmup_steps)
    ratio = final / base if base > 0 else 1.0
    if step < warmup_steps:
        factor = (step + 1) / warmup_steps
    elif step >= decay_end:
        factor = ratio
    else:
        progress = (step - warmup_steps) / max(decay_end - warmup_steps, 1)
        factor = ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * factor


@dataclass(frozen=True)
class LossSchedule:
    """When each part of the recipe is on, in steps (RAE counts whole epochs of `steps_per_epoch`)."""

    lpips_start: int
    disc_start: int  # first step that updates the discriminator
    gan_start: int  # first step whose decoder loss has the GAN term
    perceptual_weight: float
    disc_weight: float

    @classmethod
    def from_epochs(cls, steps_per_epoch: int, *, lpips_start: float, disc_start: float, gan_start: float,
                    perceptual_weight: float, disc_weight: float) -> "LossSchedule":
        def steps(epochs: float) -> int:
            return int(epochs * steps_per_epoch)

        return cls(steps(lpips_start), steps(disc_start), steps(gan_start), perceptual_weight, disc_weight)

    def uses_lpips(self, step: int) -> bool:
        return step >= self.lpips_start and self.perceptual_weight > 0

    def uses_gan(self, step: int) -> bool:
        return step >= self.gan_start and self.disc_weight > 0

    def trains_disc(self, step: int) -> bool:
        return step >= self.disc_start and self.disc_weight > 0

    @property
    def needs_disc(self) -> bool:
        return self.disc_weight > 0

    @property
    def needs_lpips(self) -> bool:
        return self.perceptual_weight > 0
