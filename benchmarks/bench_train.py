"""Training throughput and memory of `fastdit train`'s step for a table of options.

Prints steps/s, images/s and peak memory for each (model, batch, precision, activation checkpointing
policy, input) row: "latents" trains on pre-extracted VAE latents (what `fastdit extract` produces),
"images" encodes images with an SD-VAE-sized AutoencoderKL (random weights, the same compute) inside
every step, as training from an image folder does. The step is the real one (`fastdit.train.step.train_step`):
timestep/noise draws, forward, MSE+VLB loss, backward, AdamW and EMA.

    python benchmarks/bench_train.py                                  # GPU: DiT-XL/2, batch 32 per row
    python benchmarks/bench_train.py --model DiT-S/2 --batch 8 --device cpu --steps 3
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import time

import torch

from fastdit.model_info import LatentInfo
from fastdit.distributed import DistInfo
from fastdit.errors import UserError
from fastdit.latents import VAELatentSpace, latent_side
from fastdit.models import build_model
from fastdit.train.config import TrainConfig
from fastdit.train.logger import peak_memory_gb
from fastdit.train.loop import build_training_state
from fastdit.train.setup import checkpoint_stride, enable_tf32
from fastdit.train.step import train_step
from fastdit.train.training_data import TrainingData

SD_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 256,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def sd_sized_vae(device):
    from diffusers import AutoencoderKL

    return VAELatentSpace(AutoencoderKL(**SD_VAE_CONFIG), name="sd-vae-sized (random weights)").to(device)


def run_row_isolated(args, precision, checkpointing, source):
    """Each row in a fresh process, so peak memory (GPU allocator or CPU resident set) is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_row_worker, args=(queue, args, precision, checkpointing, source))
    process.start()
    result = queue.get()
    process.join()
    return result


def _row_worker(queue, args, precision, checkpointing, source):
    device = torch.device(args.device)
    enable_tf32(device, True)
    try:
        queue.put(run_row(args, device, precision, checkpointing, source, {}))
    except torch.OutOfMemoryError:
        queue.put(None)


def run_row(args, device, precision, checkpointing, source, vae_cache):
    torch.manual_seed(0)
    latent = latent_side(args.image_size)
    config = TrainConfig.create(model=args.model, image_size=args.image_size, data_path="bench", global_batch_size=args.batch,
                         precision=precision, gradient_checkpointing=checkpointing, compile=args.compile, progress=False)
    model = build_model(args.model, input_size=latent, num_classes=1000).to(device)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    on_the_fly = source == "images"
    if on_the_fly and "vae" not in vae_cache:
        vae_cache["vae"] = sd_sized_vae(device)
    data = TrainingData(dataset=None, latent_shape=(4, latent, latent), latent_info=LatentInfo(),
                        class_names=None, encode_on_the_fly=on_the_fly, latent_space=vae_cache.get("vae"), device=device)
    state = build_training_state(config, dist, model, data)
    objective = config.build_objective()
    if on_the_fly:
        x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device) * 2 - 1
    else:
        x = torch.randn(args.batch, 4, latent, latent, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step(k):
        state.position.step = k
        return train_step(state, (x, y), objective).terms["loss"]

    for k in range(args.warmup):
        step(k)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for k in range(args.steps):
        loss = step(args.warmup + k)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    return {"steps/s": 1 / seconds, "images/s": args.batch / seconds, "peak GB": peak_memory_gb(device)}
    # (on a CPU, "peak GB" is the row process's peak resident memory)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: DiT-XL/2 on a GPU, DiT-S/2 on a CPU")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on a GPU, 8 on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--checkpointing", nargs="+", default=["off", "blocks"],
                        help="activation checkpointing policies: off, blocks, mlp, every-K")
    parser.add_argument("--sources", nargs="+", default=["latents", "images"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    try:  # an unknown policy stops here, not in the first row's process
        [checkpoint_stride(policy) for policy in args.checkpointing]
    except UserError as err:
        parser.error(str(err))
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.model = args.model or ("DiT-XL/2" if gpu else "DiT-S/2")
    args.batch = args.batch or (32 if gpu else 8)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"fastdit training step: {args.model} at {args.image_size}px, batch {args.batch}, on {name}, torch {torch.__version__}")
    print(f"{'precision':>9} {'ckpt':>8} {'input':>8} {'steps/s':>8} {'images/s':>9} {'peak GB':>8}")
    for precision, ckpt, source in itertools.product(args.precisions, args.checkpointing, args.sources):
        row = run_row_isolated(args, precision, ckpt, source)
        if row is None:
            print(f"{precision:>9} {ckpt:>8} {source:>8} {'out of memory':>27}", flush=True)
        else:
            print(f"{precision:>9} {ckpt:>8} {source:>8} {row['steps/s']:8.3f} {row['images/s']:9.1f} {row['peak GB']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
