"""The settings of a decoder-training run: typed sections whose fields are `fastdit train-decoder`'s flags
(`fastdit.train.options.option`: each name, default, range and help written once), validated once,
written as JSON into the run folder and into every checkpoint.

Defaults are RAE's decoder training (configs/stage1/training/DINOv2-B_decXL.yaml): a ViT-XL decoder on
DINOv2-B tokens at 256 px, noise tau 0.8, 16 epochs at global batch 512, AdamW (lr 2e-4, betas 0.9/0.95,
no weight decay) with one epoch of warm-up and a cosine to 2e-5, EMA 0.9978, no gradient clipping;
LPIPS weight 1 from the start; the discriminator trained from epoch 6 and its loss (weight 0.75, adaptive,
at most 1e4) in the decoder's from epoch 8; hinge loss; DiffAug with probability 1 and no cutout.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..cpu_threads import MAX_DATA_WORKERS, data_workers
from ..errors import UserError
from ..rae.decoder import DECODER_PRESETS
from ..run_folder import refuse_other_settings
from ..seeding import MAX_SEED
from ..train.options import SectionedConfig, check_numbers, option, section_fields
from .losses import DISC_LOSSES
from .lpips import MIN_SIDE as LPIPS_MIN_SIDE

TRAINING_PRECISIONS = ("fp32", "bf16")


@dataclass
class DecoderSection:
    encoder: str | None = option(None, "the frozen encoder whose tokens the decoder learns to read: rae:dinov2-b-reg "
                                       "(RAE's DINOv2-B with registers, as RAE's latent space reads it; also "
                                       "rae:dinov2-b-reg-512, rae:FOLDER), or any encoder of REPA's --repa: a name "
                                       "such as dinov2-vitb14, hf:<owner>/<repo>, NAME=FOLDER, or a TorchScript file "
                                       "(.pt/.ts) mapping normalised images to tokens (the digits demo's encoder)")
    encoder_resolution: int | None = option(None, "the encoder's input side in pixels (default: the encoder's own; "
                                                  "not for rae: encoders, whose space fixes it)", at_least=1)
    decoder: str = option("ViT-XL", "RAE's decoder preset", choices=tuple(DECODER_PRESETS))
    decoder_depth: int | None = option(None, "override the preset's depth", at_least=1)
    decoder_hidden_size: int | None = option(None, "override the preset's width", at_least=1)
    decoder_num_heads: int | None = option(None, "override the preset's attention heads", at_least=1)
    decoder_mlp_size: int | None = option(None, "override the preset's MLP width", at_least=1)
    image_size: int = option(256, "image side in pixels; the decoder's patch is this over the encoder's token grid",
                             at_least=1)
    noise_tau: float = option(0.8, "noise augmentation of the tokens: z + sigma eps with sigma ~ U(0, tau) per image "
                                   "(RAE section 4.1; 0: none)", at_least=0)


@dataclass
class LossSection:
    perceptual_weight: float = option(1.0, "LPIPS weight (0: no LPIPS, nothing downloaded for it)", at_least=0)
    disc_weight: float = option(0.75, "GAN weight, times the adaptive weight (0: no discriminator)", at_least=0)
    lpips_start_epoch: float = option(0.0, "epoch from which LPIPS is in the loss", at_least=0)
    disc_start_epoch: float = option(6.0, "epoch from which the discriminator trains", at_least=0)
    gan_start_epoch: float = option(8.0, "epoch from which the GAN loss is in the decoder's loss", at_least=0)
    max_d_weight: float = option(1e4, "upper bound of the adaptive GAN weight", positive=True)
    disc_loss: str = option("hinge", "discriminator loss", choices=tuple(DISC_LOSSES))
    disc_kernel_size: int = option(9, "width of the discriminator heads' token convolutions (odd)", at_least=1)
    disc_input_size: int = option(224, "side the discriminator's DINO ViT-S/8 reads images at (RAE: 224 at every "
                                       "resolution; a multiple of 8)", at_least=8)
    diffaug_prob: float = option(1.0, "probability of each DiffAug operation (translation, colour, cutout)",
                                 at_least=0, at_most=1)
    diffaug_cutout: float = option(0.0, "DiffAug cutout size as a fraction of the side (0: none)", at_least=0,
                                   at_most=1)


@dataclass
class OptimisationSection:
    global_batch_size: int = option(512, "images per step, over all processes", at_least=1)
    epochs: float = option(16.0, "epochs to train; the schedule (warm-up, cosine, loss starts) is set by it",
                           positive=True)
    max_steps: int | None = option(None, "stop after this many steps (the schedule still follows --epochs)",
                                   at_least=1)
    lr: float = option(2e-4, "the decoder's peak AdamW learning rate", positive=True)
    final_lr: float = option(2e-5, "the decoder's learning rate at the end of the cosine", at_least=0)
    disc_lr: float = option(2e-4, "the discriminator's peak learning rate", positive=True)
    disc_final_lr: float = option(2e-5, "the discriminator's learning rate at the end of its cosine", at_least=0)
    warmup_epochs: float = option(1.0, "linear warm-up from zero, in epochs (the discriminator's counted from its "
                                       "first update)", at_least=0)
    beta1: float = option(0.9, "AdamW beta1 (both optimizers)", unit_interval=True)
    beta2: float = option(0.95, "AdamW beta2 (both optimizers)", unit_interval=True)
    weight_decay: float = option(0.0, "AdamW weight decay (both optimizers)", at_least=0)
    grad_clip: float | None = option(None, "clip the decoder's gradient norm to this value (RAE: no clipping)",
                                     positive=True, hint="; leave --grad-clip out for no clipping")
    ema_decay: float = option(0.9978, "EMA decay of the decoder's weights (what is exported)", unit_interval=True)
    global_seed: int = option(0, "seed of everything random", at_least=0, at_most=MAX_SEED)


@dataclass
class DataSection:
    data_path: str | None = option(None, "training images: a folder (class subfolders, or the images themselves), "
                                         "ADM centre-cropped to --image-size and flipped at random; or 'digits'")
    num_workers: int = option(data_workers(), "data loader worker processes (default: one per usable core, at most "
                                              f"{MAX_DATA_WORKERS})", at_least=0)


@dataclass
class RunSection:
    precision: str = option("fp32", "fp32 or bf16 (autocast)", choices=TRAINING_PRECISIONS)
    gradient_checkpointing: str = option("off", "recompute the decoder's activations in backward: off, blocks (every "
                                                "block; the flag alone) or every-K", flag_alone="blocks")
    compile: bool = option(False, "torch.compile each decoder block")
    tf32: bool = option(True, "TF32 matmuls on GPUs")
    device: str = option("auto", "auto (cuda if available), cpu, cuda")
    results_dir: str = option("results", "folder of run folders")
    run_name: str | None = option(None, "run folder name (default: encoder, decoder, size and data); the same "
                                        "command resumes it")
    log_every: int = option(100, "log every N steps", at_least=1)
    ckpt_every: int = option(5000, "checkpoint every N steps (and at the end)", at_least=1)
    keep_last: int = option(3, "checkpoints to keep", at_least=1)
    tensorboard: bool = option(True, "write TensorBoard event files")
    progress: bool = option(True, "show a progress bar")


@dataclass
class EvaluationSection:
    eval_data: str | None = option(None, "held-out images for the reconstruction FID (rFID) and PSNR: a folder as "
                                         "--data-path (centre crop, no flip), or 'digits' (the held-out digits); "
                                         "evaluated at the end, and every --eval-every steps")
    eval_images: int = option(0, "how many of them (the first in sorted order; 0: all)", at_least=0)
    eval_every: int = option(0, "rFID every N steps too (0: only at the end)", at_least=0)
    eval_batch_size: int = option(32, "images per batch for that evaluation", at_least=1)
    inception_weights: str | None = option(None, "local Inception weights for the rFID (default: downloaded once)")


SECTIONS = {"decoder": DecoderSection, "loss": LossSection, "optimisation": OptimisationSection,
            "data": DataSection, "run": RunSection, "evaluation": EvaluationSection}

# Settings that may change when a run resumes: how long it runs and how it is watched, stored or computed.
# Everything else defines what is trained (the schedule follows --epochs, so --epochs defines the run).
RESUMABLE_CHANGES = frozenset({
    "max_steps", "num_workers", "compile", "tf32", "device", "results_dir", "run_name", "log_every", "ckpt_every",
    "keep_last", "tensorboard", "progress", "gradient_checkpointing", "eval_data", "eval_images", "eval_every",
    "eval_batch_size", "inception_weights",
})


def flat_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """{flat key: (section, field)} over every section."""
    return section_fields(SECTIONS)


class _Methods(SectionedConfig):
    """What `DecoderTrainConfig` does; its fields, one per section, are made below."""

    SECTIONS = SECTIONS
    KIND = "decoder-training"

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderTrainConfig":
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise UserError("a decoder-training run config is a JSON object of sections")
        known = flat_fields()
        return cls.create(**{k: v for part in data.values() for k, v in part.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def resolved_run_name(self) -> str:
        if self.run.run_name:
            return self.run.run_name
        encoder = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(self.decoder.encoder).rstrip("/")).name).strip("-")
        data = Path(str(self.data.data_path).rstrip("/")).name or "data"
        return f"decoder-{encoder or 'encoder'}-{self.decoder.decoder}-{self.decoder.image_size}px-{data}"

    def run_dir(self) -> Path:
        return Path(self.run.results_dir) / self.resolved_run_name()

    def validate(self) -> "DecoderTrainConfig":
        if not self.decoder.encoder:
            raise UserError("no encoder: pass --encoder, e.g. rae:dinov2-b-reg (RAE's latent space) or a TorchScript "
                            "encoder file")
        if not self.data.data_path:
            raise UserError("no training images: pass --data-path (a folder of images) or --data-path digits")
        check_numbers({section: getattr(self, section) for section in SECTIONS})
        if self.run.precision not in TRAINING_PRECISIONS:
            raise UserError(f"--precision {self.run.precision!r}: decoder training runs in fp32 or bf16 (one gradient "
                            "scaler cannot serve its two optimizers); use --precision bf16")
        policy = self.run.gradient_checkpointing
        if policy not in ("off", "blocks") and not re.fullmatch(r"every-[1-9][0-9]*", str(policy)):
            raise UserError(f"--gradient-checkpointing {policy!r}: the decoder takes off, blocks or every-K (K >= 1, "
                            "e.g. every-2)")
        loss = self.loss
        if loss.disc_kernel_size % 2 == 0:
            raise UserError(f"--disc-kernel-size must be odd (a centred convolution), got {loss.disc_kernel_size}")
        if loss.disc_input_size % 8:
            raise UserError(f"--disc-input-size must be a multiple of 8 (the DINO ViT-S/8's patch), got "
                            f"{loss.disc_input_size}; RAE uses 224")
        if self.optimisation.final_lr > self.optimisation.lr or self.optimisation.disc_final_lr > self.optimisation.disc_lr:
            raise UserError("--final-lr / --disc-final-lr must not exceed --lr / --disc-lr (the cosine decays to it)")
        if loss.perceptual_weight > 0 and self.decoder.image_size < LPIPS_MIN_SIDE:
            raise UserError(f"LPIPS reads images of at least {LPIPS_MIN_SIDE} px (VGG16 pools four times), not "
                            f"{self.decoder.image_size}; pass --perceptual-weight 0 for images this small")
        if self.evaluation.eval_every and not self.evaluation.eval_data:
            raise UserError("--eval-every needs --eval-data (held-out images to reconstruct)")
        if self.decoder.encoder.startswith("rae:") and self.decoder.encoder_resolution is not None:
            raise UserError("--encoder-resolution does not apply to an rae: encoder (its space fixes the input size); "
                            "leave it out")
        return self

    def refuse_other_run(self, requested: "DecoderTrainConfig", what: str, fix: str) -> None:
        refuse_other_settings(what, self.to_flat(), requested.to_flat(), fix, ignore=RESUMABLE_CHANGES)


DecoderTrainConfig = dataclasses.make_dataclass(
    "DecoderTrainConfig", [(name, cls, field(default_factory=cls)) for name, cls in SECTIONS.items()],
    bases=(_Methods,), namespace={"__module__": __name__},
)
DecoderTrainConfig.__doc__ = "A decoder-training run's settings, in SECTIONS; `DecoderTrainConfig.create(**flat)`."
