"""The sampler registry: each sampler is one function, registered with its name, the view of the model
it needs and the options it takes.

A sampler is `run(view, x, *, num_steps, noise_fn, progress, **options) -> x at data`, where `view` is
a `ModelView` (the model as its objective presents it, with the labels and the time shift) and
`num_steps` is the sampler's own count (model calls for DDPM and the grid samplers, grid points as SiT
counts them for the flow ODE/SDE samplers, steps for MeanFlow's). `needs` names the view ("velocity",
"grid", "gaussian" or "average-velocity", `fastdit.objectives.base`): an objective is offered every
sampler whose view it provides, and `min_steps` is the fewest steps it can take. `options`
are the `SamplingOptions` fields beyond the common ones that the sampler reads (DDIM's eta); any other
set to a non-default value is an error naming the samplers that take it.

Watching a run: a view made with `on_estimate` hands it the current estimate of the clean sample, x̂
(N, C, H, W), after every model call (the app's previews and its Stop button use it). The views
report it themselves, so a sampler over the velocity, grid or average-velocity view reports with no
code of its own; ancestral DDPM passes the hook to `ddpm_sample`. The hook only reads: the samples
are bitwise those of a run without it.

To add a sampler: write the integrator as a plain function of (view's callable, x, grid, ...) and
register a small adapter with `@register_sampler("name", needs=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import OptionError, UserError
from ..objectives import Grid, Objective, objective_names, objective_class, time_grid
from .flow import SIT_LAST_STEP_SIZE, FlowSDE, mean_flow_steps, ode_dopri5, ode_euler, ode_heun, sde_euler, sde_heun
from .samplers import ddim, ddpm_sample, dpm_solver_pp_2m

# Options a sampler may take beyond the common ones, with the value that means "not set": DDIM's eta, and
# SiT's SDE settings (its sample.py's defaults: the "sigma" diffusion of norm 1, the "mean" last step of 0.04).
SAMPLER_OPTIONS = {"eta": 0.0, "diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "mean",
                   "last_step_size": SIT_LAST_STEP_SIZE}
SDE_OPTIONS = ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")


@dataclass(frozen=True)
class Sampler:
    name: str
    needs: str  # the objective's view it consumes
    run: Callable
    options: tuple[str, ...]
    # At least 2: the respaced process needs a step 1 to define the clipped posterior variance, and a
    # grid of points needs two. A sampler counting steps of one call each may go down to 1.
    min_steps: int = 2
    # The model calls of one run for (num_steps, the sampler's options); None where the sampler decides
    # (dopri5's adaptive steps). By default one call per step.
    calls: Callable[[int, dict], int | None] = lambda num_steps, options: num_steps

    def model_calls(self, num_steps: int, options: dict | None = None) -> int | None:
        """How many model calls (each a guided pair when guiding) a run of `num_steps` takes."""
        return self.calls(num_steps, {**SAMPLER_OPTIONS, **(options or {})})


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str, *, needs: str, options: tuple[str, ...] = (), min_steps: int = 2,
                     calls: Callable[[int, dict], int | None] | None = None):
    """Decorator: register `run` as sampler `name` that consumes the `needs` view; `calls(num_steps,
    options)` counts its model calls (default: one per step)."""
    unknown = set(options) - set(SAMPLER_OPTIONS)
    if unknown:
        raise ValueError(f"sampler {name!r} names unknown options {sorted(unknown)}; known: {sorted(SAMPLER_OPTIONS)}")

    def register(run: Callable) -> Callable:
        if name in SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is registered already")
        SAMPLERS[name] = Sampler(name, needs, run, tuple(options), min_steps, *([calls] if calls else []))
        return run

    return register


def sampler_names() -> tuple[str, ...]:
    return tuple(SAMPLERS)


def samplers_for(objective: Objective | str) -> tuple[str, ...]:
    """The samplers whose view the objective provides, in registration order."""
    views = (objective_class(objective) if isinstance(objective, str) else objective).views
    return tuple(name for name, sampler in SAMPLERS.items() if sampler.needs in views)


def samplers_by_objective() -> dict[str, tuple[str, ...]]:
    return {name: samplers_for(name) for name in objective_names()}


def get_sampler(name: str, objective: Objective) -> Sampler:
    """The sampler `name` for `objective`; an unknown name or one that does not fit is an OptionError
    naming the samplers that exist for it."""
    fitting = ", ".join(samplers_for(objective))
    if name not in SAMPLERS:
        raise OptionError("unknown sampler {name!r}; for this {objective} model use one of: {fitting}", "sampler",
                          name=name, objective=objective.name, fitting=fitting)
    if name not in samplers_for(objective):
        raise OptionError("sampler {name!r} does not fit this {objective} model; use one of: {fitting}", "sampler",
                          name=name, objective=objective.name, fitting=fitting)
    return SAMPLERS[name]


def check_sampler_options(sampler: Sampler, options: dict) -> None:
    """An option set to anything but its 'not set' value must be one the sampler takes."""
    for key, value in options.items():
        if key not in SAMPLER_OPTIONS:
            raise UserError(f"unknown sampler option {key!r}; known: {', '.join(SAMPLER_OPTIONS)}")
        if key not in sampler.options and value != SAMPLER_OPTIONS[key]:
            takers = [n for n, s in SAMPLERS.items() if key in s.options]
            raise OptionError("{what} is an option of the {takers} sampler{plural} only, not of {sampler!r}", key,
                              what=key.replace("_", " "), takers=" and ".join(takers), plural="s" if len(takers) > 1 else "",
                              sampler=sampler.name)


# ----------------------------------------------------------------------------------------------
# What samplers see of a model
# ----------------------------------------------------------------------------------------------


EstimateFn = Callable[[torch.Tensor], None]


class ModelView:
    """`model_fn(x, t, y)` (guided, in its precision) as `objective` presents it to samplers, for the
    labels `y`; `time_shift` warps flow-time grids; `on_estimate(x̂)`, when given, is called with the
    estimate of the clean sample after every model call (see the module doc)."""

    def __init__(self, objective: Objective, model_fn: Callable, y: torch.Tensor, *, learn_sigma: bool,
                 time_shift: float = 1.0, on_estimate: EstimateFn | None = None):
        self.objective, self.model_fn, self.y = objective, model_fn, y
        self.learn_sigma, self.time_shift = learn_sigma, time_shift
        self.on_estimate = on_estimate
        self.cond = {"y": y}

    @property
    def velocity(self) -> Callable:
        velocity_fn = self.objective.velocity(self.model_fn)
        if self.on_estimate is None:
            return velocity_fn

        def reporting(x, t, *args, **kwargs):
            velocity = velocity_fn(x, t, *args, **kwargs)
            self.on_estimate(self.objective.estimate_data(x, t, velocity))
            return velocity

        return reporting

    def sde(self, diffusion_form: str, diffusion_norm: float) -> FlowSDE:
        """SiT's sampling SDE of the model (the objective's "sde" view: velocity and score, its path)."""
        both = self.objective.velocity_and_score(self.model_fn)
        if self.on_estimate is not None:
            unreported = both

            def both(x, t, *args, **kwargs):
                velocity, score = unreported(x, t, *args, **kwargs)
                self.on_estimate(self.objective.estimate_data(x, t, velocity))
                return velocity, score

        return FlowSDE(both, self.objective.interpolant, diffusion_form=diffusion_form, diffusion_norm=diffusion_norm)

    @property
    def average_velocity(self) -> Callable:
        average_fn = self.objective.average_velocity(self.model_fn)
        if self.on_estimate is None:
            return average_fn

        def reporting(x, t, t_next, *args, **kwargs):
            # The average velocity over [t, t'] carried on to t = 1: exact for one step to t' = 1 (MeanFlow's
            # one-step sample), a straight-line guess of x̂1 for the earlier steps of a few-step run.
            velocity = average_fn(x, t, t_next, *args, **kwargs)
            self.on_estimate(self.objective.estimate_data(x, t, velocity))
            return velocity

        return reporting

    def times(self, num_points: int, start: float = 0.0, end: float = 1.0) -> torch.Tensor:
        """Flow times from `start` (0: noise) to `end`, shifted by the view's time shift."""
        return time_grid(num_points, start=start, end=end, shift=self.time_shift, device=self.y.device)

    def ode_times(self, num_points: int) -> torch.Tensor:
        """The probability-flow ODE's grid over the objective's sampling interval (SiT's: [0, 1] for a
        velocity model on the linear or GVP path)."""
        return self.times(num_points, *self.objective.sample_interval())

    def sde_times(self, num_points: int, diffusion_form: str, last_step: str, last_step_size: float) -> torch.Tensor:
        """The SDE's grid: up to 1 − last_step_size (the last step covers the rest), or SiT's end without one."""
        size = 0.0 if last_step == "none" else last_step_size
        return self.times(num_points, *self.objective.sample_interval(sde=True, diffusion_form=diffusion_form,
                                                                      last_step_size=size))

    def grid(self, num_calls: int):
        grid = self.objective.grid(self.model_fn, self.y, num_calls, learn_sigma=self.learn_sigma,
                                   time_shift=self.time_shift)
        if self.on_estimate is None:
            return grid

        def reporting(x, k):
            x0, eps = grid.denoise(x, k)
            self.on_estimate(x0)
            return x0, eps

        return Grid(reporting, grid.alphas, grid.sigmas)

    def gaussian(self, num_steps: int):
        return self.objective.gaussian(num_steps, learn_sigma=self.learn_sigma)


# ----------------------------------------------------------------------------------------------
# The built-in samplers
# ----------------------------------------------------------------------------------------------


@register_sampler("ddpm", needs="gaussian")
def _ddpm(view, x, *, num_steps, noise_fn, progress):
    """ancestral sampling with the learned variances (IDDPM; DiT's default), num_steps respaced steps"""
    return ddpm_sample(view.gaussian(num_steps), view.model_fn, x, view.y, noise_fn=noise_fn, progress=progress,
                       on_estimate=view.on_estimate)


def _sde(sampler, view, x, num_steps, noise_fn, progress, diffusion_form, diffusion_norm, last_step, last_step_size):
    sde = view.sde(diffusion_form, diffusion_norm)
    times = view.sde_times(num_steps, diffusion_form, last_step, last_step_size)
    return sampler(sde, x, times, noise_fn=noise_fn, cond=view.cond, last_step=last_step, progress=progress)


def _sde_calls(per_step: int):
    # num_steps grid points: num_steps − 1 steps of `per_step` calls, then the last step's one (none for "none").
    return lambda num_steps, options: per_step * (num_steps - 1) + (options["last_step"] != "none")


@register_sampler("sde-euler", needs="sde", options=SDE_OPTIONS, calls=_sde_calls(1))
def _sde_euler(view, x, *, num_steps, noise_fn, progress, diffusion_form, diffusion_norm, last_step, last_step_size):
    """SiT's SDE, Euler–Maruyama (SiT's default), num_steps grid points"""
    return _sde(sde_euler, view, x, num_steps, noise_fn, progress, diffusion_form, diffusion_norm, last_step,
                last_step_size)


@register_sampler("sde-heun", needs="sde", options=SDE_OPTIONS, calls=_sde_calls(2))
def _sde_heun(view, x, *, num_steps, noise_fn, progress, diffusion_form, diffusion_norm, last_step, last_step_size):
    """SiT's SDE, stochastic Heun, num_steps grid points"""
    return _sde(sde_heun, view, x, num_steps, noise_fn, progress, diffusion_form, diffusion_norm, last_step,
                last_step_size)


@register_sampler("euler", needs="velocity", calls=lambda num_steps, options: num_steps - 1)
def _euler(view, x, *, num_steps, noise_fn, progress):
    """the probability-flow ODE, Euler, num_steps grid points"""
    return ode_euler(view.velocity, x, view.ode_times(num_steps), cond=view.cond, progress=progress)


@register_sampler("heun", needs="velocity", calls=lambda num_steps, options: 2 * (num_steps - 1))
def _heun(view, x, *, num_steps, noise_fn, progress):
    """the probability-flow ODE, Heun (2 calls a step), num_steps grid points"""
    return ode_heun(view.velocity, x, view.ode_times(num_steps), cond=view.cond, progress=progress)


@register_sampler("dopri5", needs="velocity", calls=lambda num_steps, options: None)
def _dopri5(view, x, *, num_steps, noise_fn, progress):
    """the probability-flow ODE, adaptive Dormand–Prince (SiT's ODE default); num_steps report points"""
    return ode_dopri5(view.velocity, x, view.ode_times(num_steps), cond=view.cond)


@register_sampler("ddim", needs="grid", options=("eta",))
def _ddim(view, x, *, num_steps, noise_fn, progress, eta):
    """DDIM on the objective's (α, σ) grid, num_steps model calls; eta 0 is deterministic"""
    if eta == 0 and "velocity" in view.objective.views:
        # On the linear flow path DDIM(η = 0) IS Euler's method: with α = t, σ = 1 − t, x̂1 = x + (1 − t) v
        # and ε̂ = x − t v, the DDIM update t' x̂1 + (1 − t') ε̂ equals x + (t' − t) v. One implementation
        # serves both: Euler on the grid of num_steps + 1 points (num_steps model calls, as DDIM counts).
        return ode_euler(view.velocity, x, view.times(num_steps + 1), cond=view.cond, progress=progress)
    return ddim(view.grid(num_steps), x, eta=eta, noise_fn=noise_fn, progress=progress)


@register_sampler("dpm++2m", needs="grid")
def _dpm_solver(view, x, *, num_steps, noise_fn, progress):
    """DPM-Solver++(2M) on the objective's (α, σ) grid, num_steps model calls"""
    return dpm_solver_pp_2m(view.grid(num_steps), x, progress=progress)


@register_sampler("meanflow", needs="average-velocity", min_steps=1)
def _meanflow(view, x, *, num_steps, noise_fn, progress):
    """MeanFlow's sampler: x <- x + (t' - t) u(x, t, t') over num_steps steps; 1 step = one model call"""
    return mean_flow_steps(view.average_velocity, x, view.times(num_steps + 1), cond=view.cond, progress=progress)
