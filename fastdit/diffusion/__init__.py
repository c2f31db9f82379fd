from .gaussian import GaussianDiffusion, VarianceType, create_diffusion
from .schedule import linear_betas, respace_betas, space_timesteps

__all__ = ["GaussianDiffusion", "VarianceType", "create_diffusion", "linear_betas", "respace_betas", "space_timesteps"]

from .flow import FlowMatching, velocity_channels  # noqa: E402  (appended: flow matching, SiT)

__all__ += ["FlowMatching", "velocity_channels"]
