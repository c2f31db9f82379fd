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
