"""The objective interface: what makes a training method what it is, in one object.

An objective owns
* its **settings**: the fields of its dataclass, recorded in every checkpoint and export (`to_dict`)
  and turned into `fastdit train` flags (each field's `help` metadata is the flag's help text);
* its **training draws** for one sample (`draw`): any number of times, noises and flags, in a fixed
  order from the one generator the training loop seeds by (seed, step, global sample index), so that
  kill-and-resume is bit-exact and N processes train on what one process does;
* its **loss as named terms** (`losses(network, x, draws, conditions)`): per-sample tensors, `"loss"`
  the one that is optimised, the others (`"mse"`, `"vb"`, ...) logged beside it. `network` is the
  `TrainingNetwork` the step hands over (`fastdit.objectives.network`): the trained forward, and a
  forward of the same weights for targets that need no gradient;
* what it needs of the **network** beyond the DiT's defaults (`network_options`, `DiTConfig` fields:
  MeanFlow's second time input);
* its **time** (`time_range`, and `flow_time` when the time is flow matching's 0 = noise ... 1 = data,
  where a time shift of the sampling grid applies) and the **denoiser views** samplers consume
  (`views`): "velocity" (dx/dt on the flow path), "grid" (x̂0 and ε̂ on a grid of (α, σ)), "gaussian"
  (the respaced IDDPM process with its learned variances), "average-velocity" (MeanFlow's u: the mean
  of dx/dt over an interval, for jumps in one call), "sde" (the velocity and the score from one call,
  with the path they live on, for SiT's sampling SDE). `fastdit.sampling.registry` offers an objective
  every sampler whose view it provides;
* its **sampling policy** (`sampling`, `fastdit.objectives.policy.SamplingPolicy`): the sampler and
  steps used when nothing says otherwise, and the guidance the trained network admits (trained in,
  or fed as an input).

An objective is registered by name with `register_objective`; `fastdit.objectives` imports every
built-in one. The network contract is DiT's: `model(x, t, **conditions) -> (N, C or 2C, H, W)`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch

from ..errors import UserError
from .network import TrainingNetwork
from .policy import SamplingPolicy
from .views import Grid

ModelFn = Callable[..., torch.Tensor]
VIEWS = ("velocity", "grid", "gaussian", "average-velocity", "sde")


def setting(default, help: str, **kwargs):
    """A recorded objective setting with its flag's help text, written once here."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass
class Objective(ABC):
    name: ClassVar[str]
    time_range: ClassVar[tuple[float, float]]
    flow_time: ClassVar[bool]  # t in [0, 1], 0 = noise: a time shift of the sampling grid applies
    views: ClassVar[frozenset[str]]
    # What the network is trained for, in a line: `fastdit train --help` lists it with the name.
    summary: ClassVar[str]
    # `DiTConfig` fields the objective's network must have (the training builds it so; loading checks).
    network_options: ClassVar[dict] = {}
    # How its models are sampled when nothing says otherwise (a property where settings decide it).
    sampling: ClassVar[SamplingPolicy]

    # ------------------------------------------------------------------------------------------
    # recorded settings
    # ------------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a UserError for a setting out of range; called on construction."""

    def to_dict(self) -> dict:
        return {"objective": self.name, **dataclasses.asdict(self)}

    def network(self) -> dict:
        """The `DiTConfig` fields this objective's network must have: `network_options`, which a
        setting may extend (an input the setting adds)."""
        return dict(self.network_options)

    def check_network(self, config) -> None:
        """A UserError for a network (`DiTConfig`) this objective cannot train or sample: a DiT^DH embeds
        its time by Gaussian Fourier features of a real t in [0, 1] (RAE's), which only flow time gives."""
        if config.has_head and not self.flow_time:
            raise UserError(f"DiT^DH embeds a time in [0, 1] (RAE's Fourier features), not the {self.name} "
                            f"objective's; train it with --objective rae (RAE's recipe), flow or x-pred")

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------

    @abstractmethod
    def draw(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        """The random draws of one training sample of `shape` (C, H, W), each with a leading batch
        dimension of 1, drawn from `generator` in a fixed order."""

    @abstractmethod
    def losses(
        self, network: TrainingNetwork, x: torch.Tensor, draws: dict[str, torch.Tensor], conditions: dict
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms (N,) of clean inputs `x` under `draws` (`draw`'s tensors, concatenated
        over the batch) and `conditions` (the model inputs of every pass: labels `y` and the label
        dropout `force_drop_ids`); "loss" is what the step optimises. `network(x, t, **conditions)` is
        the trained forward on this batch; `network.target` the same weights for no-grad passes."""

    # ------------------------------------------------------------------------------------------
    # the views samplers consume (each objective provides those named in `views`)
    # ------------------------------------------------------------------------------------------

    def velocity(self, model_fn: ModelFn) -> ModelFn:
        """`v(x, t, y)`: dx/dt on the flow path x_t = t x1 + (1 − t) ε, t in [0, 1] (0 = noise)."""
        raise self._no_view("velocity")

    def grid(self, model_fn: ModelFn, y: torch.Tensor, num_calls: int, *, learn_sigma: bool, time_shift: float) -> Grid:
        """`num_calls` model calls from noise to data as a `Grid` of (α, σ) with `denoise -> (x̂0, ε̂)`."""
        raise self._no_view("grid")

    def gaussian(self, num_steps: int, *, learn_sigma: bool):
        """The IDDPM process respaced to `num_steps` steps (ancestral sampling with learned variances)."""
        raise self._no_view("gaussian")

    def average_velocity(self, model_fn: ModelFn) -> ModelFn:
        """`u(x, t, t_next, y)`: the average of dx/dt over [t, t_next] in flow time (0 = noise), so that
        x(t_next) = x + (t_next − t) u exactly for the true u (MeanFlow)."""
        raise self._no_view("average-velocity")

    def velocity_and_score(self, model_fn: ModelFn) -> ModelFn:
        """`(v, s)(x, t, y)`: the velocity and the score ∇log p_t(x) from one model call, for SiT's
        sampling SDE; `interpolant` is the path (α_t, σ_t) they belong to."""
        raise self._no_view("sde")

    def sample_interval(self, *, sde: bool = False, diffusion_form: str = "sigma",
                        last_step_size: float = 0.0) -> tuple[float, float]:
        """The flow times (t0, t1) a sampler integrates over: all of [0, 1], an SDE up to its last step."""
        return 0.0, (1.0 - last_step_size if sde else 1.0)

    def estimate_data(self, x: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """E[x1 | x_t = x] from the velocity on the linear path, x + (1 − t) v (t of shape (N,) or a
        scalar): what a preview shows of a flow model's sample after each model call."""
        return x + (1 - t).reshape(-1, *([1] * (x.ndim - 1))) * velocity

    def network_interval(self, interval: tuple[float, float] | None) -> tuple[float, float] | None:
        """A span (low, high) of this objective's time as the times the network itself is called with,
        which a guidance wrapper around the network compares: the same span, except for an objective
        whose network runs on another clock (RAE's, where 1 is noise)."""
        return interval

    def sampling_time_shift(self, input_shape: tuple[int, ...]) -> float | None:
        """The time shift of the sampling grid that goes with how this objective trains a network of
        inputs `input_shape` (C, H, W), for the recipe its checkpoints record; None: the sampling default."""
        return None

    def _no_view(self, view: str) -> Exception:
        return NotImplementedError(f"the {self.name} objective provides no {view} view (it provides: {', '.join(sorted(self.views))})")


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Add an objective class under its `name` (used as a class decorator). Its settings become
    `fastdit train` flags: a setting another objective has too must have the same type and default,
    since both read the one flag."""
    if not (isinstance(cls.name, str) and cls.name):
        raise ValueError(f"{cls.__name__} needs a name")
    if cls.name in OBJECTIVES:
        raise ValueError(f"an objective named {cls.name!r} is registered already")
    unknown = set(cls.views) - set(VIEWS)
    if unknown:
        raise ValueError(f"{cls.__name__} names unknown views {sorted(unknown)}; the views are {VIEWS}")
    shared = all_settings()
    for field in dataclasses.fields(cls):
        if "help" not in field.metadata:
            raise ValueError(f"{cls.__name__}.{field.name} needs a help text (declare it with `setting`)")
        other = shared.get(field.name)
        if other is not None and (other.type != field.type or other.default != field.default):
            raise ValueError(f"{cls.__name__}.{field.name} differs from another objective's setting of that name")
    OBJECTIVES[cls.name] = cls
    return cls


def objective_names() -> tuple[str, ...]:
    return tuple(OBJECTIVES)


def all_settings() -> dict[str, dataclasses.Field]:
    """Every registered objective's settings by name (one flag each), in registration order."""
    settings: dict[str, dataclasses.Field] = {}
    for cls in OBJECTIVES.values():
        for field in dataclasses.fields(cls):
            settings.setdefault(field.name, field)
    return settings


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(name: str, **settings) -> Objective:
    """The objective `name` with `settings`. A setting of another objective is accepted only at its
    default value (every objective's settings share one set of flags and one recorded config); set to
    anything else it is an error, since it would silently do nothing."""
    cls = objective_class(name)
    own = {field.name for field in dataclasses.fields(cls)}
    shared = all_settings()
    for key, value in settings.items():
        if key in own:
            continue
        if key not in shared:
            raise UserError(f"unknown setting {key!r} of the {name} objective; its settings: {', '.join(sorted(own)) or 'none'}")
        if value != shared[key].default:
            users = [n for n, c in OBJECTIVES.items() if key in {f.name for f in dataclasses.fields(c)}]
            raise UserError(
                f"--{key.replace('_', '-')} applies to the {' and '.join(users)} objective(s), not to {name}; "
                f"leave it at {shared[key].default!r}"
            )
    return cls(**{key: value for key, value in settings.items() if key in own})


def objective_from_dict(data: dict | None) -> Objective:
    """The objective recorded in a checkpoint, export or run config. Files written before the
    objective was recorded hold DDPM (IDDPM ε) models, which is what they are."""
    data = dict(data or {})
    if not isinstance(data.get("objective", "ddpm"), str):
        raise UserError(f"the recorded objective {data.get('objective')!r} is not a name")
    return build_objective(data.pop("objective", "ddpm"), **data)
