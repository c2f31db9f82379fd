"""Training objectives, one module each, registered by name (`fastdit.objectives.base`):

* `ddpm`   DiT's IDDPM process (ε and learned variance, MSE + VLB)       `ddpm.py`
* `flow`   SiT's flow matching (velocity on the linear path)            `flow.py`
* `x-pred` JiT's x-prediction (clean image, loss on the velocity)        `x_pred.py`
* `meanflow` MeanFlow's average velocity (one-step sampling)             `meanflow.py`
* `rae`    RAE's flow matching of DiT^DH (reversed time, dimension shift) `rae.py`

Adding one is a module with a registered `Objective` dataclass and one import line below.
"""

from .base import (
    OBJECTIVES,
    Objective,
    all_settings,
    build_objective,
    objective_class,
    objective_from_dict,
    objective_names,
    register_objective,
    setting,
)
from .network import TrainingNetwork
from .policy import SamplingPolicy
from .views import Grid, flow_grid, gaussian_grid, shift_times, time_grid

# The built-in objectives: importing a module registers it.
from . import ddpm, flow, x_pred, meanflow, rae  # noqa: E402,F401  isort: skip

__all__ = [
    "OBJECTIVES",
    "Grid",
    "Objective",
    "SamplingPolicy",
    "TrainingNetwork",
    "all_settings",
    "build_objective",
    "flow_grid",
    "gaussian_grid",
    "objective_class",
    "objective_from_dict",
    "objective_names",
    "register_objective",
    "setting",
    "shift_times",
    "time_grid",
]
