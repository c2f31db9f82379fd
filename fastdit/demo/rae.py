"""The digits demo in an RAE latent space (`fastdit demo --latent rae`): RAE's whole path on a CPU.

RAE (Zheng, Ma, Tong & Xie 2025) diffuses in the token space of a frozen representation encoder and
decodes with a ViT decoder trained on that encoder's tokens. On the digits:

1. the frozen encoder is the demo's digit encoder (`fastdit.demo.encoder`: 4x4 tokens, 64 wide, trained
   in seconds on the DiT's training split; REPA's target in the pixel demo);
2. `fastdit train-decoder` trains RAE's ViT decoder on its noise-augmented tokens (RAE section 4.1), with
   L1 alone: LPIPS reads images of at least 16 px and the discriminator's DINO ViT-S/8 would be a download,
   so at 8 px the recipe's other two losses are off. The run folder is the latent space `rae:FOLDER` (its
   rae.json names the encoder copy, the EMA decoder and the token statistics);
3. DiT^DH-T (RAE's wide-head DiT, tiny) trains on the normalised tokens with RAE's objective, encoding
   the digits on the fly, is sampled, and its samples are decoded and judged as the pixel demo's are.

The time shift: RAE shifts its logit-normal times by sqrt(d / base) for latents of d = C·H·W values, so that
bigger latents see more noise. The pixel demo trains unshifted on 64 values (1 x 8 x 8); base 64 keeps that
as the reference, and the 1,024 values (64 x 4 x 4) of the digit tokens get a shift of 4.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

DECODER_RUN = "decoder"  # train-decoder's run folder inside --out: the latent space rae:<out>/decoder
MODEL = "DiTDH-T"
# The pixel demo's time-shift reference (module docstring): its 1 x 8 x 8 digits train unshifted.
TIME_SHIFT_BASE = 64


@dataclass(frozen=True)
class DecoderRecipe:
    """The decoder of the digit tokens: RAE's ViT decoder, 2 blocks of width 128 (the digits need no more:
    held-out reconstructions measured PSNR 35.9 dB and 100% class match after 40 epochs), with RAE's
    token noise at tau 0.5 (the tokens' per-element std is ~1 once normalised; 0.8, RAE's, for DINOv2's
    larger tokens)."""

    epochs: float = 40.0
    batch_size: int = 64
    lr: float = 1e-3
    final_lr: float = 1e-4
    ema_decay: float = 0.99
    noise_tau: float = 0.5
    depth: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    mlp_size: int = 256


DECODER = DecoderRecipe()


def decoder_train_config(config, encoder: Path):
    """The `fastdit train-decoder` run of `fastdit demo --latent rae` (`config`: the `DemoConfig`)."""
    from ..decoder_training.config import DecoderTrainConfig

    recipe = DECODER
    epochs = config.decoder_epochs if config.decoder_epochs is not None else recipe.epochs
    return DecoderTrainConfig.create(
        encoder=str(encoder), data_path="digits", image_size=8, decoder="ViT-B", decoder_depth=recipe.depth,
        decoder_hidden_size=recipe.hidden_size, decoder_num_heads=recipe.num_heads, decoder_mlp_size=recipe.mlp_size,
        noise_tau=recipe.noise_tau, perceptual_weight=0.0, disc_weight=0.0, global_batch_size=recipe.batch_size,
        epochs=float(epochs), warmup_epochs=min(1.0, float(epochs)), lr=recipe.lr, final_lr=recipe.final_lr,
        ema_decay=recipe.ema_decay, global_seed=config.seed, num_workers=0, device=config.device,
        results_dir=str(config.out), run_name=DECODER_RUN, log_every=100, ckpt_every=10**9, keep_last=1,
        tensorboard=False, progress=config.progress)


def train_digit_decoder(config) -> dict:
    """The digit encoder (once per --out), then its decoder (resumed or skipped when already trained);
    returns the space's name and what was measured of the decoder."""
    from ..decoder_training.loop import train_decoder
    from .encoder import digit_encoder_file

    started = time.perf_counter()
    encoder = digit_encoder_file(config.out, config.seed)
    result = train_decoder(decoder_train_config(config, encoder))
    return {"space": f"rae:{Path(result.run_dir).resolve()}", "steps": result.step,
            "seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def reconstruction_report(space, judge, seed: int) -> dict:
    """How well the space keeps a digit: the judge's class match and the PSNR of the decoded tokens of
    the held-out digits (neither the encoder, the decoder nor the DiT trained on them)."""
    from ..data import load_digits_tensors, split_digits
    from ..data.digits import DIGITS_HELDOUT_FRACTION
    from ..sampling import to_uint8
    from .classifier import classify, uint8_to_model_input
    from .report import accuracy

    images, labels = load_digits_tensors()
    _, heldout = split_digits(labels, DIGITS_HELDOUT_FRACTION, seed)
    real = images[heldout]
    decoded = space.decode(space.encode(real.to(space.mean.device))).cpu()
    squared = ((decoded.clamp(-1, 1) - real) / 2).square().mean(dim=(1, 2, 3)).double()  # in [0, 1] units
    predicted, _ = classify(judge.classifier, uint8_to_model_input(to_uint8(decoded)))
    return {"images": int(len(heldout)), "psnr": float((10 * torch.log10(1 / squared.clamp_min(1e-10))).mean()),
            "class_match": accuracy(predicted, labels[heldout].numpy())}


def format_latent_lines(latent: dict, pixel_reference: dict) -> list[str]:
    """The lines `fastdit demo --latent rae` prints besides the pixel demo's."""
    rec = latent["reconstruction"]
    return [
        f"RAE latent space {latent['space']}: digit encoder tokens 64x4x4, decoder trained {latent['decoder_steps']} "
        f"steps ({latent['decoder_seconds']:.0f} s in this run)",
        f"decoder on {rec['images']} held-out digits: PSNR {rec['psnr']:.1f} dB, {rec['class_match']:.2%} classified "
        "as their class",
        f"the pixel demo for comparison (its recipe, {pixel_reference['steps']} steps; README): "
        f"{pixel_reference['class_match']:.1%} classified as their class, Frechet {pixel_reference['frechet']:.1f}",
    ]
