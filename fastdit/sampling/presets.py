"""Named sampling presets: the settings behind published FIDs, as data (`fastdit presets` lists them).

Each preset is a recipe (`fastdit.sampling.recipe`) plus where its figure comes from. A preset that
names a model and image size samples the official weights of that model by default; one that does not
(`repa-sde-250`) is a recipe for a model you trained, given with --ckpt. Any flag overrides one field.
The published figures are FID-50K against ImageNet's training set with the ADM evaluator, on 50,000
samples whose labels were drawn at random (what DiT's and SiT's sample_ddp.py do), or 50 per class
(RAE's sample_ddp.py, `--label-sampling equal`, its default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from .recipe import RecipeSource

FID_SAMPLES = 50_000


@dataclass(frozen=True)
class Preset:
    name: str
    objective: str  # what the model must be trained for: its sampler is one of this objective's
    recipe: dict  # recipe fields (`fastdit.sampling.recipe.RECIPE_FIELDS`)
    published: dict  # metric -> value, e.g. {"fid": 2.27}; empty when the recipe has no figure of its own
    source: str  # paper, table, row

    def as_source(self) -> RecipeSource:
        return RecipeSource(f"preset {self.name}", dict(self.recipe), preset=self.name)


# DiT (Peebles & Xie 2023): the official sample_ddp.py at cfg 1.5, 250 DDPM steps, guidance on the
# first 3 of the 4 latent channels (its forward_with_cfg).
_DIT = {"sampler": "ddpm", "num_steps": 250, "cfg_scale": 1.5, "guided_channels": 3, "guidance_interval": None,
        "time_shift": 1.0, "label_sampling": "random", "num_samples": FID_SAMPLES}
# SiT (Ma et al. 2024): the official sample_ddp.py at cfg 1.5, guiding DiT's 3 channels (the fixtures
# README under shared/fixtures/official-sit); 250 grid points for the SDE and for dopri5's reports.
_SIT = {"model": "SiT-XL/2", "image_size": 256, "cfg_scale": 1.5, "guided_channels": 3, "guidance_interval": None,
        "time_shift": 1.0, "label_sampling": "random", "num_samples": FID_SAMPLES}

_RAE = {"model": "DiTDH-XL", "sampler": "euler", "num_steps": 50, "cfg_scale": 1.0, "guided_channels": None,
        "guidance_interval": None, "guidance_model": None, "label_sampling": "equal", "num_samples": FID_SAMPLES}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("dit-xl2-256", "ddpm", {"model": "DiT-XL/2", "image_size": 256, **_DIT}, {"fid": 2.27},
           "DiT paper (Peebles & Xie 2023), the table 'Benchmarking class-conditional image generation on ImageNet 256x256', row DiT-XL/2-G (cfg=1.50)"),
    Preset("dit-xl2-512", "ddpm", {"model": "DiT-XL/2", "image_size": 512, **_DIT}, {"fid": 3.04},
           "DiT paper (Peebles & Xie 2023), the table 'Benchmarking class-conditional image generation on ImageNet 512x512', row DiT-XL/2-G (cfg=1.50)"),
    # SiT's SDE: Euler-Maruyama over 250 grid points, the last step the drift alone ("Mean").
    Preset("sit-xl2-sde", "flow", {**_SIT, "sampler": "sde-euler", "num_steps": 250}, {"fid": 2.06},
           "SiT paper (Ma et al. 2024), row SiT-XL/2 (cfg=1.5, SDE); SiT README: FID 2.06, SDE, 250 steps"),
    # SiT's ODE: sample.py's ODE default, adaptive dopri5 (atol 1e-6, rtol 1e-3) between t = 0 and 1.
    Preset("sit-xl2-ode", "flow", {**_SIT, "sampler": "dopri5", "num_steps": 250}, {"fid": 2.15},
           "SiT paper (Ma et al. 2024), row SiT-XL/2 (cfg=1.5, ODE)"),
    # REPA's sampling (Yu et al. 2025, its generate.py: mode sde, 250 steps, cfg 1.8, guidance_high 0.7):
    # guided where REPA's time t_R (1 = noise, 0 = data) lies in [0, 0.7]. fastdit's flow time is
    # t = 1 - t_R (0 = noise, 1 = data; `fastdit.objectives.flow`, the interval is compared with the
    # model's time in `fastdit.sampling.guidance`), so [0, 0.7] in t_R is [0.3, 1.0] in t: no guidance
    # over the noisiest 30% of the path. All 4 channels are guided, as REPA's sampler does.
    Preset("repa-sde-250", "flow", {"sampler": "sde-euler", "num_steps": 250, "cfg_scale": 1.8,
                                    "guided_channels": None, "guidance_interval": (0.3, 1.0), "time_shift": 1.0,
                                    "label_sampling": "random", "num_samples": FID_SAMPLES},
           {"fid": 1.42}, "REPA paper (Yu et al. 2025), row SiT-XL/2 + REPA, 800 epochs, cfg 1.8 with guidance "
                          "interval; a recipe for your own flow models (the figure is REPA's model)"),
    # RAE (Zheng et al. 2025), its configs/stage2/sampling: the Euler ODE over 50 points of RAE's interval, the
    # time shift sqrt(768·16·16 / 4096) = sqrt(48) at 256 px and sqrt(768·32·32 / 4096) = sqrt(192) at 512, every
    # channel guided over the whole interval (t-min 0, t-max 1), 50 images per class (its sample_ddp.py's
    # default `--label-sampling equal`). AutoGuidance guides DiT^DH-XL by the released DiT^DH-S (14 epochs at
    # 256 px, scale 1.42; 20 epochs at 512, scale 1.5).
    Preset("rae-ditdh-xl-256", "rae", {**_RAE, "image_size": 256, "time_shift": math.sqrt(768 * 16 * 16 / 4096)},
           {"fid": 1.51}, "RAE paper (Zheng et al. 2025): DiT^DH-XL on DINOv2-B RAE latents, ImageNet 256x256 without "
                          "guidance, FID 1.51; configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B.yaml"),
    Preset("rae-ditdh-xl-256-ag", "rae", {**_RAE, "image_size": 256, "time_shift": math.sqrt(768 * 16 * 16 / 4096),
                                          "cfg_scale": 1.42, "guidance_model": "DiTDH-S-256x256.pt"},
           {"fid": 1.13}, "RAE paper (Zheng et al. 2025): DiT^DH-XL, ImageNet 256x256 with AutoGuidance, FID 1.13; "
                          "configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B_AG.yaml (guide DiT^DH-S, 14 epochs)"),
    Preset("rae-ditdh-xl-512-ag", "rae", {**_RAE, "image_size": 512, "time_shift": math.sqrt(768 * 32 * 32 / 4096),
                                          "cfg_scale": 1.5, "guidance_model": "DiTDH-S-512x512.pt"},
           {"fid": 1.13}, "RAE paper (Zheng et al. 2025): DiT^DH-XL, ImageNet 512x512 with AutoGuidance, FID 1.13; "
                          "configs/stage2/sampling/ImageNet512/DiTDH-XL_DINOv2-B_decXL_AG.yaml (XL of 400 epochs, "
                          "guide DiT^DH-S of 20)"),
)}


def check_fits_official_weights(preset: Preset | None, model_name: str | None) -> None:
    """Refuse, before anything is downloaded, a preset given without --ckpt whose sampler the official
    weights it would sample cannot run: those of `model_name` (the preset's, a --model flag's, else
    DiT-XL/2, `fastdit.loading.official_checkpoint_name`), trained for another objective than the preset's
    (repa-sde-250, a flow recipe that names no model, would otherwise fetch DiT-XL/2 and then refuse it)."""
    from ..hub import official_objective

    if preset is None:
        return
    model = model_name or DEFAULT_OFFICIAL_MODEL
    objective = official_objective(model)
    if objective != preset.objective:
        mine = " you trained" if "model" not in preset.recipe else ""
        raise UserError(f"preset {preset.name} samples {preset.objective} models{mine}, but without --ckpt the "
                        f"official {model} weights would be sampled, a {objective} model; pass --ckpt with a "
                        f"{preset.objective} model" + (f", or --model {_OFFICIAL_OF[preset.objective]}"
                                                      if preset.objective in _OFFICIAL_OF and not mine else ""))


DEFAULT_OFFICIAL_MODEL = "DiT-XL/2"  # what fastdit samples when neither --ckpt nor --model says
_OFFICIAL_OF = {"ddpm": "DiT-XL/2", "flow": "SiT-XL/2", "rae": "DiTDH-XL"}  # a released model of each objective


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; `fastdit presets` lists them: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)
