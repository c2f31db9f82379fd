from .flow import (
    FLOW_SAMPLERS,
    SIT_LAST_STEP_SIZE,
    STOCHASTIC_FLOW_SAMPLERS,
    GuidedVelocity,
    VelocityModel,
    get_flow_sampler,
    ode_dopri5,
    ode_euler,
    ode_heun,
    sde_euler,
    sde_heun,
    shift_times,
    time_grid,
)
from .generate import SamplingOptions, check_labels, generate, sample_latents, to_uint8
from .guidance import ClassifierFreeGuidance, guide
from .noise import PerImageNoise
from .samplers import Grid, ddim, ddpm_sample, dpm_solver_pp_2m, flow_grid, gaussian_grid

__all__ = [
    "FLOW_SAMPLERS",
    "SIT_LAST_STEP_SIZE",
    "STOCHASTIC_FLOW_SAMPLERS",
    "ClassifierFreeGuidance",
    "Grid",
    "GuidedVelocity",
    "PerImageNoise",
    "SamplingOptions",
    "VelocityModel",
    "check_labels",
    "ddim",
    "ddpm_sample",
    "dpm_solver_pp_2m",
    "flow_grid",
    "gaussian_grid",
    "generate",
    "get_flow_sampler",
    "guide",
    "ode_dopri5",
    "ode_euler",
    "ode_heun",
    "sample_latents",
    "sde_euler",
    "sde_heun",
    "shift_times",
    "time_grid",
    "to_uint8",
]
