"""Training presets: the published recipes behind the sampling presets, as data (`fastdit train --preset
NAME`; `fastdit presets` lists them beside the sampling side).

A preset is a set of flat `TrainConfig` fields (the names of `fastdit train`'s flags). The command's flags
are applied over it, each overriding one field, and the run records the preset's name (`run.preset`).
The data is the user's (--features-path, a latent store from `fastdit extract`, or --data-path): a
preset names the resolution and the latent space the paper trained in (a store made with another VAE is
refused by the store's own check; --vae overrides). Systems settings (precision, checkpointing, FSDP)
are left to the machine; the papers' own are said in `notes`.

The values are the papers' and their released training scripts', cited per preset.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1K's training set: what "epochs" count in the papers below


@dataclass(frozen=True)
class TrainPreset:
    name: str
    settings: dict  # flat TrainConfig fields (`fastdit train` flag names)
    sampling: tuple[str, ...]  # the sampling presets of the model it trains (`fastdit.sampling.presets`)
    published: dict  # metric -> value of the trained model, as the source reports it
    source: str  # paper, table, script
    notes: str = ""  # where fastdit's run differs from the paper's, or what the paper adds outside these fields

    def flags(self, given: dict) -> dict:
        """The flat settings of a run: this preset's, each field a flag gave overridden, and its name."""
        return {**self.settings, **given, "preset": self.name}

    def steps(self) -> int:
        """Optimizer steps the recipe trains: its max_steps, else its epochs of ImageNet at its batch."""
        if self.settings.get("max_steps"):
            return int(self.settings["max_steps"])
        return int(self.settings["epochs"]) * (IMAGENET_TRAIN_IMAGES // int(self.settings["global_batch_size"]))


# DiT (Peebles & Xie 2023), section 4 and its train.py: AdamW at a constant 1e-4, no weight decay, batch
# 256, EMA 0.9999, horizontal flips only, the learned-variance IDDPM loss on 1000 linear-schedule steps,
# label dropout 0.1; Stable Diffusion's VAE (train.py's default --vae ema: "choice doesn't affect training")
# at 256 px, 32x32x4 latents. The sampling recipe its checkpoints record: DDPM 250 at cfg 1.5 (FID-50K).
_DIT = {"model": "DiT-XL/2", "image_size": 256, "vae": "ema", "objective": "ddpm", "learn_sigma": True,
        "class_dropout_prob": 0.1, "global_batch_size": 256, "lr": 1e-4, "weight_decay": 0.0, "beta1": 0.9,
        "beta2": 0.999, "warmup_steps": 0, "grad_clip": None, "ema_decay": 0.9999,
        "recipe_sampler": "ddpm", "recipe_steps": 250, "recipe_cfg_scale": 1.5}
# SiT (Ma et al. 2024): DiT's backbone and optimisation, the linear interpolant with velocity prediction,
# t uniform (its train.py: --path-type Linear --prediction velocity), 7M steps for the headline row.
_SIT = {**_DIT, "model": "SiT-XL/2", "objective": "flow", "time_sampling": "uniform", "recipe_sampler": "sde-euler"}

TRAIN_PRESETS: dict[str, TrainPreset] = {p.name: p for p in (
    TrainPreset("dit-xl2", {**_DIT, "max_steps": 7_000_000}, ("dit-xl2-256",), {"fid": 2.27},
                "DiT paper (Peebles & Xie 2023), section 4 and Table 4: DiT-XL/2 trained 7M steps, FID-50K 2.27 at "
                "cfg 1.5 (DDPM 250); facebookresearch/DiT train.py",
                "DiT trained in fp32 (TF32 on A100s)"),
    TrainPreset("dit-xl2-400k", {**_DIT, "max_steps": 400_000, "recipe_cfg_scale": 1.0}, ("dit-xl2-256",),
                {"fid": 19.47},
                "DiT paper (Peebles & Xie 2023), Table 4: every model compared at 400K steps without guidance; "
                "DiT-XL/2: FID-50K 19.47",
                "sample it unguided: sample-ddp --preset dit-xl2-256 --cfg-scale 1"),
    TrainPreset("sit-xl2", {**_SIT, "max_steps": 7_000_000}, ("sit-xl2-sde", "sit-xl2-ode"), {"fid": 2.06},
                "SiT paper (Ma et al. 2024), SiT-XL/2 trained 7M steps: FID-50K 2.06 (SDE, cfg 1.5), 2.15 (ODE); "
                "willisma/SiT train.py (DiT's optimisation, --vae ema)"),
    # REPA (Yu et al. 2025), its train.py and README: SiT-XL/2, linear path, v-prediction, uniform weighting,
    # DINOv2-B/14 patch tokens aligned at block 8 with weight 0.5 through a 3-layer MLP of width 2048 (its
    # projector), AdamW 1e-4 (betas 0.9, 0.999, no decay), gradients clipped at 1.0, batch 256, label
    # dropout 0.1, EMA 0.9999 (DiT's update_ema), latents of sd-vae-ft-mse; the released checkpoint trained
    # 4M iterations (800 epochs) for FID 1.42 with REPA's sampler (preset repa-sde-250).
    TrainPreset("repa-sit-xl2", {**_SIT, "vae": "mse", "grad_clip": 1.0, "repa": "dinov2-vitb14", "repa_depth": 8,
                                 "repa_weight": 0.5, "repa_projector_dim": 2048, "max_steps": 4_000_000,
                                 "recipe_cfg_scale": 1.8},
                ("repa-sde-250",), {"fid": 1.42},
                "REPA paper (Yu et al. 2025), SiT-XL/2 + REPA at 800 epochs (4M iterations): FID-50K 1.42 with cfg "
                "1.8 and guidance interval; sihyun-yu/REPA train.py defaults and README",
                "REPA trains in fp16 mixed precision (accelerate); add --precision bf16 or fp16. Its 400K-step row "
                "(FID 5.9 without guidance): --max-steps 400000"),
    # MeanFlow (Geng et al. 2025), MeanFlow-XL/2 at 240 epochs, FID 3.43 at one step. The configuration table
    # (appendix, Table 4) as two public re-implementations restate it (NVIDIA fastgen's MeanFlow configs,
    # wmchen/meanflow): Adam 1e-4 with betas (0.9, 0.95), no weight decay, batch 256, EMA 0.9999, label
    # dropout 0.1, r != t for 25% of the samples, (t, r) from lognorm(-0.4, 1.0), adaptive weight p = 1;
    # XL's guidance trained in with omega 0.2 and kappa 0.92 (effective scale omega / (1 - kappa) = 2.5).
    TrainPreset("meanflow-xl2", {"model": "DiT-XL/2", "image_size": 256, "objective": "meanflow", "learn_sigma": False,
                                 "class_dropout_prob": 0.1, "global_batch_size": 256, "lr": 1e-4, "weight_decay": 0.0,
                                 "beta1": 0.9, "beta2": 0.95, "warmup_steps": 0, "grad_clip": None,
                                 "ema_decay": 0.9999, "epochs": 240, "meanflow_ratio": 0.25,
                                 "meanflow_time_mean": -0.4, "meanflow_time_std": 1.0, "meanflow_p": 1.0,
                                 "meanflow_omega": 0.2, "meanflow_kappa": 0.92, "recipe_sampler": "meanflow",
                                 "recipe_steps": 1},
                (), {"fid": 3.43},
                "MeanFlow paper (Geng et al. 2025), Table 2: MeanFlow-XL/2, 240 epochs, FID-50K 3.43 at 1 NFE; the "
                "configurations of its appendix Table 4 as NVIDIA fastgen's and wmchen/meanflow's XL configs restate them",
                "the paper also limits the trained-in guidance to t in [0, 0.75] (its time, 1 = noise), which fastdit's "
                "MeanFlow does not do (guidance over the whole path); its SD-VAE latents: pass the store you extracted"),
    # RAE (Zheng et al. 2025), configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml: DiT^DH-XL (28 blocks
    # of 1152 and a head of 2 of 2048, SwiGLU, RMSNorm, RoPE: the DiTDH-XL preset) on the 768x16x16 tokens of
    # DINOv2-B with registers (rae:dinov2-b-reg), RAE's flow with the time shift sqrt(768*16*16 / 4096),
    # t logit-normal(0, 1); AdamW 2e-4, betas (0.9, 0.95), no decay, batch 1024, clipping at 1.0, EMA 0.9995,
    # label dropout 0.1; its "linear" scheduler: 2e-4 for 40 epochs, linear to 2e-5 at epoch 800. The paper's
    # headline model is the one of 800 epochs (its config runs on to 1400 at 2e-5).
    TrainPreset("rae-ditdh-xl", {"model": "DiTDH-XL", "image_size": 256, "vae": "rae:dinov2-b-reg", "objective": "rae",
                                 "class_dropout_prob": 0.1, "global_batch_size": 1024, "lr": 2e-4, "final_lr": 2e-5,
                                 "lr_decay_start": 40 * (IMAGENET_TRAIN_IMAGES // 1024),
                                 "lr_decay_end": 800 * (IMAGENET_TRAIN_IMAGES // 1024), "weight_decay": 0.0,
                                 "beta1": 0.9, "beta2": 0.95, "warmup_steps": 0, "grad_clip": 1.0,
                                 "ema_decay": 0.9995, "epochs": 800},
                ("rae-ditdh-xl-256", "rae-ditdh-xl-256-ag"), {"fid": 1.51},
                "RAE paper (Zheng et al. 2025): DiT^DH-XL on DINOv2-B RAE latents, 800 epochs, FID-50K 1.51 unguided, "
                "1.13 with AutoGuidance; bytetriper/RAE configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml",
                "RAE trains in bf16 or fp32 (its --precision) with torch.compile; AutoGuidance needs the guide too: "
                "DiTDH-S trained 14 epochs (--model DiTDH-S --epochs 14)"),
)}


def get_train_preset(name: str) -> TrainPreset:
    if name not in TRAIN_PRESETS:
        raise UserError(f"unknown training preset {name!r}; `fastdit presets` lists them: {', '.join(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[name]


def train_preset_names() -> tuple[str, ...]:
    return tuple(TRAIN_PRESETS)


# What `fastdit presets` estimates the GPU time with: model FLOPs over an H100 SXM's dense bf16 peak at the
# best public training efficiencies for DiT-XL/2 (ANCHORS: LightningDiT ≈20% MFU, OpenDiT ≈13% on an H800).
H100_BF16_TFLOPS = 989.0
ASSUMED_MFU = (0.20, 0.13)


def training_flops(preset: TrainPreset) -> float:
    """The model FLOPs of the whole recipe: per image what a training step computes (forward and backward,
    MeanFlow's JVP and guided targets, REPA's encoder and projector: `fastdit.bench.table.step_flops`),
    times the images it trains on."""
    from ..bench.rows import Row
    from ..bench.table import step_flops
    from ..models import config_from_name
    from ..rae.space import describe, is_rae_name
    from .config import TrainConfig

    config = TrainConfig.create(**preset.flags({}))
    channels, downsample = 4, 8  # the SD VAE's latents
    if is_rae_name(config.data.vae):
        spec = describe(config.data.vae)
        channels, downsample = spec.decoder.latent_dim, spec.downsample
    network = config_from_name(config.model.name, input_size=config.model.image_size // downsample,
                               in_channels=channels, **config.model_options())
    row = Row(preset.name, objective=config.objective.name, repa=config.alignment.repa is not None)
    per_image = step_flops("train", network, row, 1, objective=config.build_objective())
    return per_image * preset.steps() * config.optimisation.global_batch_size


def estimated_gpu_hours(preset: TrainPreset) -> tuple[float, float]:
    """(hours at the better assumed MFU, hours at the worse) on H100s: an estimate, not a measurement."""
    flops = training_flops(preset)
    return tuple(flops / (H100_BF16_TFLOPS * 1e12 * mfu) / 3600 for mfu in ASSUMED_MFU)
