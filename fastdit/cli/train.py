"""`fastdit train`: train a DiT on a latent store, an image folder or the digits, on 1…N processes."""

from __future__ import annotations

import argparse

from ..train.config import TrainConfig
from .dataclass_args import add_dataclass_arguments, dataclass_from_args

HELP = "train a DiT (one process, or torchrun / accelerate launch for many GPUs and nodes)"

HELP_TEXTS = {
    "model": "preset name, e.g. DiT-XL/2, DiT-B/4, DiT-T/2",
    "image_size": "image side in pixels",
    "num_classes": "number of classes (1 with --class-dropout-prob 0 trains an unconditional model)",
    "class_dropout_prob": "label dropout for classifier-free guidance",
    "features_path": "latent store written by `fastdit extract` (fastest)",
    "data_path": "image folder with one subfolder per class (encoded on the fly), or 'digits'",
    "vae": "ema, mse, a diffusers AutoencoderKL folder, or pixels (default: the store's VAE; ema for images; pixels for digits)",
    "global_batch_size": "images per optimizer step, over all processes",
    "micro_batch_size": "images per forward pass on one process; smaller than the per-process batch -> gradient accumulation",
    "lr": "AdamW learning rate (DiT: 1e-4)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "grad_clip": "clip the gradient norm to this value",
    "ema_decay": "EMA decay per step",
    "epochs": "epochs to train (--max-steps wins when given)",
    "max_steps": "optimizer steps to train",
    "global_seed": "seed of everything random",
    "precision": "fp32, bf16 or fp16 (with a gradient scaler)",
    "gradient_checkpointing": "recompute activations in backward to save memory: off, blocks (every block; the "
                              "flag alone), mlp (each block's MLP only) or every-K (blocks 0, K, 2K, ...)",
    "fsdp": "shard parameters, gradients and optimizer state over the processes (FSDP2) instead of DDP",
    "compile": "torch.compile each transformer block (regional: start-up compiles one block, not the model)",
    "tf32": "TF32 matmuls on GPUs",
    "results_dir": "folder of run folders",
    "run_name": "run folder name (default: model, image size and data); the same command resumes it",
    "log_every": "log every N steps",
    "ckpt_every": "checkpoint every N steps (and at the end)",
    "keep_last": "checkpoints to keep",
    "sample_every": "write an EMA sample grid every N steps (0: never)",
    "sample_steps": "sampling steps for those grids (the process's own sampler)",
    "eval_every": "FID of the EMA model every N steps (0: never; needs --eval-ref)",
    "eval_samples": "samples for that FID",
    "eval_ref": "reference .npz / folder / statistics for that FID",
    "eval_sampling_steps": "sampling steps for that FID (the process's own sampler)",
    "eval_cfg_scale": "guidance scale for that FID (1: none, as the paper's training curves)",
    "inception_weights": "local Inception weights for --eval-every",
    "objective": "ddpm (DiT's IDDPM process) or flow (SiT: linear path, velocity prediction); recorded in checkpoints",
    "time_sampling": "flow: how training draws t, uniform (SiT) or logit-normal (SD3)",
    "logit_normal_mean": "flow, logit-normal: mean m of t = sigmoid(m + s n) (SiT's time: 0 noise, 1 data)",
    "logit_normal_std": "flow, logit-normal: std s",
    "norm": "layernorm (official) or rmsnorm",
    "mlp": "gelu (official) or swiglu (parameter-matched)",
    "rope": "2-D rotary position embedding on q and k",
    "qk_norm": "normalise q and k of every head",
    "depth": "override the preset's depth",
    "hidden_size": "override the preset's width",
    "num_heads": "override the preset's attention heads",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TrainConfig, HELP_TEXTS, skip=("gradient_checkpointing",))
    # A policy string; the flag alone still means every block, as when it was an on/off switch.
    parser.add_argument("--gradient-checkpointing", "--grad-checkpointing", nargs="?", const="blocks",
                        default=TrainConfig.gradient_checkpointing, metavar="POLICY",
                        help=f"{HELP_TEXTS['gradient_checkpointing']} (default: {TrainConfig.gradient_checkpointing})")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const",
                        const="off", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from ..train.loop import train

    config = dataclass_from_args(TrainConfig, args)
    result = train(config)
    if result.export is not None:
        print(f"done: step {result.step}, run folder {result.run_dir}; sample with: fastdit sample --ckpt {result.export}")
    return 0
