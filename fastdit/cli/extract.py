"""`fastdit extract`: encode an image folder with the VAE (or an RAE's encoder) into a sharded latent store.

    fastdit extract --data-path imagenet/train --features-path features/imagenet256
    torchrun --nproc_per_node 8 -m fastdit extract --data-path ... --features-path ...

The work is in `fastdit.data.extract`; this module only parses flags.
"""

from __future__ import annotations

import argparse

HELP = "encode an image folder with the VAE (or an RAE encoder) into a sharded latent store for fast training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-path", required=True,
                        help="image folder with one subfolder per class (like ImageNet's train split)")
    parser.add_argument("--features-path", required=True,
                        help="folder of the latent store to write (created; continued if it exists)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="ADM centre crop size in pixels, a multiple of 8 (default 256); an RAE space takes its "
                             "decoder's size (256 for rae:dinov2-b-reg, 512 for rae:dinov2-b-reg-512)")
    parser.add_argument("--vae", default="ema",
                        help='"ema" or "mse" (the SD VAEs DiT uses), a hub id or a local diffusers folder; or an RAE '
                             'latent space (Zheng et al. 2025): rae:dinov2-b-reg, rae:dinov2-b-reg-512 or rae:FOLDER '
                             "(768x16x16 tokens per image at 256 px: about 0.79 MB per image and flip pair in float16, "
                             "1 TB for ImageNet)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per VAE call and process, each encoded with its flip (default 32)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard file (default 10000)")
    from ..cpu_threads import MAX_DATA_WORKERS, data_workers

    parser.add_argument("--num-workers", type=int, default=data_workers(),
                        help=f"image decoding workers per process (default: one per usable core, at most "
                             f"{MAX_DATA_WORKERS}: {data_workers()} here)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="storage dtype of the posterior mean and std, or of an RAE's latents (default float16)")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave out images that cannot be decoded (counted, and listed in meta.json)")
    parser.add_argument("--with-images", action="store_true",
                        help="also store each image's centre crop (PNG, lossless) for encoders that must see the "
                             "trained image (REPA); 60-75%% of the raw pixels' size. On a store without images, "
                             "encodes it again with them")
    parser.add_argument("--verify", action="store_true",
                        help="then read every item of the store whole (each stored crop decoded): the damaged ones "
                             "are named with the shards to delete, which the same command then encodes again")
    parser.add_argument("--device", default="auto",
                        help="auto (this process's GPU if any, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.extract import ExtractConfig, extract_latents

    names = ExtractConfig.__dataclass_fields__
    extract_latents(ExtractConfig(**{name: getattr(args, name) for name in names}))
    return 0


