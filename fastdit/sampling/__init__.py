from .generate import SamplingOptions, check_labels, generate, to_uint8
from .guidance import ClassifierFreeGuidance, guide
from .noise import PerImageNoise
from .samplers import SAMPLERS, ddim_sample, ddpm_sample, dpm_solver_pp_2m_sample, get_sampler

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "PerImageNoise",
    "SamplingOptions",
    "check_labels",
    "ddim_sample",
    "ddpm_sample",
    "dpm_solver_pp_2m_sample",
    "generate",
    "get_sampler",
    "guide",
    "to_uint8",
]

from .flow import (  # noqa: E402  (appended: flow-matching samplers, SiT)
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

__all__ += [
    "FLOW_SAMPLERS",
    "SIT_LAST_STEP_SIZE",
    "STOCHASTIC_FLOW_SAMPLERS",
    "GuidedVelocity",
    "VelocityModel",
    "get_flow_sampler",
    "ode_dopri5",
    "ode_euler",
    "ode_heun",
    "sde_euler",
    "sde_heun",
    "shift_times",
    "time_grid",
]
