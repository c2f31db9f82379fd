"""`fastdit bench train|sample`: the speed and memory of one training step or one guided sampling step,
each row in a fresh process, as ratios to the reference row of the same precision (the official DiT
step, under a plain autocast for bf16/fp16). Speed figures need an otherwise idle machine: other jobs skew the rows unequally."""

from __future__ import annotations

import argparse

import torch

from ..errors import UserError
from ..sampling import OFFICIAL_CFG_SCALE

# A benchmark measures the machine as it is: it does not adapt its threads to the load (--threads sets them).
MEASURES_THE_MACHINE = True
HELP = "speed and memory of a training or guided sampling step, against a reference row (the official step)"

# Every precision has its reference row: ratios are stated against the official step at the same
# precision (reference+bf16 is the official step under a plain torch.autocast). fp16 rows on GPUs only:
# torch's CPU matmuls do not accelerate fp16.
TRAIN_ROWS = {
    "cpu": ["reference", "reference+bf16", "fastdit", "fastdit+compile", "fastdit+route", "fastdit+ckpt-mlp",
            "fastdit+ckpt-every-2", "fastdit+ckpt", "fastdit+bf16", "fastdit+bf16+route", "fastdit+bf16+ckpt-mlp",
            "fastdit+bf16+ckpt"],
    "cuda": ["reference", "reference+bf16", "reference+fp16", "fastdit", "fastdit+compile", "fastdit+route",
             "fastdit+bf16", "fastdit+bf16+compile", "fastdit+bf16+compile+route", "fastdit+fp16+compile",
             "fastdit+bf16+compile+ckpt-mlp", "fastdit+bf16+compile+ckpt"],
}
SAMPLE_ROWS = {
    "cpu": ["reference", "reference+bf16", "fastdit", "fastdit+compile", "fastdit+bf16", "fastdit+bf16+compile"],
    "cuda": ["reference", "reference+bf16", "reference+fp16", "fastdit", "fastdit+compile", "fastdit+bf16",
             "fastdit+bf16+compile", "fastdit+fp16+compile"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    jobs = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    for job, what in (("train", "one training step: forward, MSE + VLB, backward, AdamW, EMA"),
                      ("sample", "one guided DDPM step: the doubled batch, guidance, p_sample")):
        sub = jobs.add_parser(job, help=what, description=what)
        sub.add_argument("--model", default=None, help="default: DiT-XL/2 on a GPU, DiT-S/2 on a CPU")
        sub.add_argument("--image-size", type=int, default=256, help="image side; the latent is 1/8 of it (default 256)")
        sub.add_argument("--batch", type=int, default=None, help="images per step (default: 32 on a GPU, 8 on a CPU)")
        sub.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
        sub.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                         help="rows to run: reference (the official step; +bf16 or +fp16: under a plain autocast, "
                         "what rows of that precision are compared with), or fastdit with +bf16, +fp16, +compile"
                         + (", +ckpt, +ckpt-mlp, +ckpt-every-K, +repa (REPA's alignment with a DINOv2-B/14-sized encoder), "
                            "+route (token routing, TREAD's rate and span), +flow, +x-pred, +meanflow (the objective)"
                            if job == "train" else "") + " (default: a set for the device)")
        sub.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
        sub.add_argument("--steps", type=int, default=3, help="timed steps")
        sub.add_argument("--peak-tflops", type=float, default=None,
                         help="the GPU's dense bf16 peak, for MFU (default: looked up by the GPU's name)")
        if job == "sample":
            sub.add_argument("--cfg-scale", type=float, default=OFFICIAL_CFG_SCALE,
                             help=f"guidance scale of the sampling step (default: {OFFICIAL_CFG_SCALE}, DiT's)")


def run(args: argparse.Namespace) -> int:
    from ..bench.flops import peak_tflops
    from ..bench.rows import parse_row
    from ..bench.table import device_name, run_table
    from ..devices import resolve_device
    from ..models import config_from_name

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    model = args.model or ("DiT-XL/2" if gpu else "DiT-S/2")
    batch = args.batch if args.batch is not None else (32 if gpu else 8)  # `or` would run --batch 0 with 8
    if args.image_size % 8 or args.image_size <= 0:
        raise UserError(f"--image-size {args.image_size} is not a positive multiple of 8 (the VAE's downsampling)")
    if batch < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError("--batch and --steps must be at least 1, --warmup at least 0")
    config_from_name(model)  # an unknown name is one line here, not a traceback in every row's process
    defaults = (TRAIN_ROWS if args.job == "train" else SAMPLE_ROWS)["cuda" if gpu else "cpu"]
    rows = [parse_row(name, training=args.job == "train") for name in (args.rows or defaults)]
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if gpu else None)
    settings = dict(device=str(device), model=model, batch=batch, latent=args.image_size // 8, warmup=args.warmup,
                    steps=args.steps, cfg_scale=getattr(args, "cfg_scale", None))
    what = "training step" if args.job == "train" else f"guided sampling step (cfg {args.cfg_scale})"
    print(f"{what}: {model} at {args.image_size}px, batch {batch}, on {device_name(device)}, torch {torch.__version__}",
          flush=True)
    if gpu and peak is None:
        print("(MFU left out: unknown GPU; pass --peak-tflops with its dense bf16 peak)")
    elif gpu:
        print(f"(MFU against {peak:g} TFLOP/s dense bf16; FLOPs of the model, recomputation not counted)")
    run_table(args.job, rows, settings, peak=peak)
    return 0
