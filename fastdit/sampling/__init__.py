from .flow import (
    SIT_LAST_STEP_SIZE,
    FlowSDE,
    VelocityModel,
    mean_flow_steps,
    ode_dopri5,
    ode_euler,
    ode_heun,
    sde_euler,
    sde_heun,
    shift_times,
    time_grid,
)
from .generate import check_labels, generate, guided_model, sample_latents, to_uint8
from .options import OFFICIAL_CFG_SCALE, OFFICIAL_NUM_STEPS, OPTIONS, Option, SamplingOptions
from .guidance import AutoGuidance, ClassifierFreeGuidance, check_cfg_scale, check_guidance_interval, guide, open_at_range_ends
from .noise import PerImageNoise
from .registry import SAMPLERS, ModelView, get_sampler, register_sampler, sampler_names, samplers_by_objective, samplers_for
from .samplers import ddim, ddpm_sample, dpm_solver_pp_2m
from ..objectives.views import Grid, flow_grid, gaussian_grid

__all__ = [
    "OFFICIAL_CFG_SCALE",
    "OFFICIAL_NUM_STEPS",
    "SAMPLERS",
    "SIT_LAST_STEP_SIZE",
    "AutoGuidance",
    "ClassifierFreeGuidance",
    "FlowSDE",
    "Grid",
    "ModelView",
    "OPTIONS",
    "Option",
    "PerImageNoise",
    "SamplingOptions",
    "VelocityModel",
    "check_cfg_scale",
    "check_guidance_interval",
    "check_labels",
    "ddim",
    "ddpm_sample",
    "dpm_solver_pp_2m",
    "flow_grid",
    "gaussian_grid",
    "generate",
    "get_sampler",
    "guide",
    "guided_model",
    "mean_flow_steps",
    "ode_dopri5",
    "open_at_range_ends",
    "ode_euler",
    "ode_heun",
    "register_sampler",
    "sample_latents",
    "sampler_names",
    "samplers_by_objective",
    "samplers_for",
    "sde_euler",
    "sde_heun",
    "shift_times",
    "time_grid",
    "to_uint8",
]
