"""`fastdit train-decoder`: train RAE's ViT decoder for a frozen encoder (RAE's stage 1).

    fastdit train-decoder --encoder rae:dinov2-b-reg --data-path imagenet/train --eval-data imagenet/val
    torchrun --nproc_per_node 8 -m fastdit train-decoder ...       # the same run on 8 GPUs

The work is in `fastdit.decoder_training`; this module only parses flags.
"""

from __future__ import annotations

import argparse
import os
import shlex

from ..program import program_words
from .dataclass_args import add_dataclass_arguments

HELP = "train RAE's ViT decoder on a frozen encoder's tokens (RAE stage 1: L1 + LPIPS + GAN), with rFID"
EPILOG = """examples:
  RAE's decoder for its DINOv2-B encoder at 256 px, RAE's recipe (16 epochs, batch 512), on 8 GPUs:
    torchrun --nproc_per_node 8 -m fastdit train-decoder --encoder rae:dinov2-b-reg \\
        --data-path imagenet/train --eval-data imagenet/val --eval-images 10000 --precision bf16
  the run folder is then an RAE latent space (rae.json, the EMA decoder, the token statistics):
    fastdit extract --vae rae:results/RUN --data-path imagenet/train --features-path STORE
  a small decoder for the digits demo's TorchScript encoder (what `fastdit demo --latent rae` runs), in
  under a minute on a CPU; the run folder is then the latent space rae:results/decoder:
    fastdit train-decoder --encoder digit-encoder-seed0.ts --data-path digits --image-size 8 \\
        --decoder-depth 2 --decoder-hidden-size 128 --decoder-num-heads 4 --decoder-mlp-size 256 \\
        --perceptual-weight 0 --disc-weight 0 --noise-tau 0.5 --global-batch-size 64 --epochs 40 \\
        --lr 1e-3 --final-lr 1e-4 --ema-decay 0.99 --run-name decoder

The same command resumes a stopped run. LPIPS (torchvision's VGG16 and LPIPS's heads) and the DINO
ViT-S/8 of the discriminator are downloaded once into fastdit's cache; offline, the message says where
to put each file (or leave its loss out: --perceptual-weight 0, --disc-weight 0). LPIPS needs images of
at least 16 px.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..decoder_training.config import SECTIONS

    for section, cls in SECTIONS.items():
        add_dataclass_arguments(parser.add_argument_group(section), cls)


def run(args: argparse.Namespace) -> int:
    from ..decoder_training.config import DecoderTrainConfig, flat_fields
    from ..decoder_training.loop import train_decoder

    config = DecoderTrainConfig.create(**{name: getattr(args, name) for name in flat_fields()})
    result = train_decoder(config)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, the main process's line alone
        lines = [f"done: step {result.step}, run folder {result.run_dir}"]
        if result.metrics:
            lines.append(f"rFID {result.metrics['rfid']:.3f}, PSNR {result.metrics['psnr']:.2f} dB on "
                         f"{result.metrics['images']} held-out images")
        if result.export is not None:
            lines.append(f"EMA decoder (RAE's key layout): {result.export}")
        if (result.run_dir / "rae.json").is_file():
            extract = shlex.join([*program_words(), "extract", "--vae", f"rae:{result.run_dir}", "--data-path",
                                  "IMAGES", "--features-path", "STORE"])
            lines.append(f"its latent space: {extract}")
        print("\n".join(lines))
    return 0
