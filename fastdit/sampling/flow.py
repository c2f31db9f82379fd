"""Samplers for flow-matching models (SiT), as pure functions over a time grid.

Contract: `velocity_fn(x, t, **cond) -> v` with t of shape (N,) in [0, 1], t = 0 noise, t = 1 data
(`fastdit.diffusion.flow`); the SDE samplers take a `FlowSDE`, SiT's sampling SDE of a model (its
velocity and score from one call, the path, the diffusion). Every sampler takes the start noise `x`
(at times[0]) and an increasing `times` grid (`time_grid`), and returns the state at times[-1] (after
the SDE's last step, at 1).
`callback(i, x)` receives the state after step i. Fresh noise comes from `noise_fn(x)`, so that the
caller can seed it per image (`fastdit.sampling.noise.PerImageNoise`). `mean_flow_steps` takes
MeanFlow's average velocity `u(x, t, t', **cond)` instead of v.

The conventions are those of SiT's `transport` package (Ma et al. 2024): ODE grids are
`linspace(t0, t1, num_points)` (SiT's `num_steps` is the number of points; [t0, t1] is [0, 1] for
velocity models on the linear and GVP paths, SiT's slightly shorter interval for the others); SDE
grids stop at 1 − last_step_size and a last step ("mean": the drift alone) goes the rest of the way to 1.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..diffusion.flow import DIFFUSION_FORMS, Interpolant, LinearPath, VelocityModel
from ..errors import UserError
from ..objectives.views import shift_times, time_grid
from ..program import install_command
from ..progress import tqdm

__all__ = ["SIT_LAST_STEP_SIZE", "LAST_STEPS", "FlowSDE", "VelocityModel", "mean_flow_steps", "ode_dopri5", "ode_euler",
           "ode_heun", "sde_euler", "sde_heun", "shift_times", "time_grid"]  # the last ones re-exported

VelocityFn = Callable[..., torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor], None]

# SiT's default SDE last step: the grid ends at 1 − 0.04 and the "Mean" step covers the rest.
SIT_LAST_STEP_SIZE = 0.04
LAST_STEPS = ("mean", "tweedie", "euler", "none")


def _steps(times: torch.Tensor, progress: bool, desc: str):
    pairs = list(enumerate(zip(times[:-1], times[1:])))
    return tqdm(pairs, desc=desc, leave=False) if progress else pairs


def _batch(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(1).expand(x.shape[0])


# ----------------------------------------------------------------------------------------------
# Average velocity (MeanFlow): jumps over whole intervals
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_flow_steps(
    average_velocity_fn: Callable[..., torch.Tensor], x: torch.Tensor, times: torch.Tensor, *,
    cond: dict | None = None, callback: Callback | None = None, progress: bool = False,
) -> torch.Tensor:
    """x ← x + (t' − t) u(x, t, t') with u the average velocity over [t, t'] (Geng et al. 2025, section
    4.1, z_r = z_t − (t − r) u in the paper's reversed time): exact for the true u whatever the step, so
    `times` = (0, 1) is one-step generation. One model call per step."""
    cond = cond or {}
    for i, (t, t_next) in _steps(times, progress, "MeanFlow"):
        x = x + (t_next - t) * average_velocity_fn(x, _batch(t, x), _batch(t_next, x), **cond)
        if callback is not None:
            callback(i, x)
    return x


# ----------------------------------------------------------------------------------------------
# ODE: dx/dt = v(x, t)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def ode_euler(
    velocity_fn: VelocityFn, x: torch.Tensor, times: torch.Tensor, *, cond: dict | None = None,
    callback: Callback | None = None, progress: bool = False,
) -> torch.Tensor:
    """Euler: x ← x + (t' − t) v(x, t). One model call per step."""
    cond = cond or {}
    for i, (t, t_next) in _steps(times, progress, "Euler"):
        x = x + (t_next - t) * velocity_fn(x, _batch(t, x), **cond)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def ode_heun(
    velocity_fn: VelocityFn, x: torch.Tensor, times: torch.Tensor, *, cond: dict | None = None,
    callback: Callback | None = None, progress: bool = False,
) -> torch.Tensor:
    """Heun's second-order method (explicit trapezoid; SiT's "heun2" through torchdiffeq), the last
    step included: two model calls per step."""
    cond = cond or {}
    for i, (t, t_next) in _steps(times, progress, "Heun"):
        dt = t_next - t
        k1 = velocity_fn(x, _batch(t, x), **cond)
        k2 = velocity_fn(x + dt * k1, _batch(t_next, x), **cond)
        x = x + dt * (0.5 * k1 + 0.5 * k2)
        if callback is not None:
            callback(i, x)
    return x


class _NonFiniteVelocity(Exception):
    """The model gave a NaN or inf velocity inside dopri5's solve."""


@torch.no_grad()
def ode_dopri5(
    velocity_fn: VelocityFn, x: torch.Tensor, times: torch.Tensor, *, cond: dict | None = None,
    callback: Callback | None = None, atol: float = 1e-6, rtol: float = 1e-3,
) -> torch.Tensor:
    """Adaptive Dormand–Prince 5(4) from torchdiffeq, SiT's default ODE sampler (atol 1e-6, rtol 1e-3);
    `times` are the points where the solution is reported, not the steps. The step sizes follow an
    error norm over the whole batch, so an image's result depends (within rtol) on its batch.

    The solver evaluates `velocity_fn` past times[-1] (a step overshoots, then is interpolated back):
    a guidance interval that ends at 1 must cover those times (`open_at_range_ends`)."""
    try:
        from torchdiffeq import odeint
    except ImportError as error:
        raise UserError(f"the dopri5 sampler needs torchdiffeq; install it with: {install_command('ode')}") from error
    cond = cond or {}

    def field(t, y):
        velocity = velocity_fn(y, _batch(t.to(times.dtype), y), **cond)
        if not torch.isfinite(velocity).all():  # the step control would shrink dt to 0 and assert
            raise _NonFiniteVelocity
        return velocity

    try:
        states = odeint(
            field,
            # One-element lists, as SiT passes them: torchdiffeq then holds them as 1-D float64 tensors,
            # which win type promotion against the float32 state, so the error control runs in float64
            # (0-d tensors, from floats, would not: the step choices would follow float32 roundings).
            x, times, method="dopri5", atol=[atol], rtol=[rtol],
        )
    except _NonFiniteVelocity:
        # The steps follow one error norm over the batch: no image has a result. NaN says so to the
        # caller's non-finite check (`fastdit.sampling.generate.check_finite`), which names the fix.
        return torch.full_like(x, float("nan"))
    if callback is not None:
        for i, state in enumerate(states[1:]):
            callback(i, state)
    return states[-1]


# ----------------------------------------------------------------------------------------------
# SDE: dx = [v + w(t) ∇log p_t(x)] dt + sqrt(2 w(t)) dW, SiT's sampling SDE with diffusion w(t)
# ----------------------------------------------------------------------------------------------


class FlowSDE:
    """SiT's sampling SDE of one model (Ma et al. 2024, section 3.3; its `Sampler.sample_sde`):

        dx = [v(x, t) + w(t) s(x, t)] dt + sqrt(2 w(t)) dW,

    whose marginals are the probability-flow ODE's for every diffusion w(t) >= 0 (w only trades drift
    for noise). `velocity_and_score(x, t, **cond) -> (v, s)` gives the velocity and the score from one
    model call (the objective's "sde" view); `interpolant` is the path they live on, which the diffusion
    forms and the Tweedie last step read (`fastdit.diffusion.flow`). `diffusion_form` and
    `diffusion_norm` choose w (SiT's `--diffusion-form`, `--diffusion-norm`)."""

    def __init__(self, velocity_and_score: Callable, interpolant: Interpolant = LinearPath(), *,
                 diffusion_form: str = "sigma", diffusion_norm: float = 1.0):
        if diffusion_form not in DIFFUSION_FORMS:
            raise UserError(f"unknown diffusion form {diffusion_form!r}; choose one of: {', '.join(DIFFUSION_FORMS)}")
        if not (math.isfinite(diffusion_norm) and diffusion_norm >= 0):
            raise UserError(f"diffusion norm must be a finite number >= 0, got {diffusion_norm}")
        self.velocity_and_score, self.interpolant = velocity_and_score, interpolant
        self.diffusion_form, self.diffusion_norm = diffusion_form, float(diffusion_norm)

    @classmethod
    def of_velocity(cls, velocity_fn: VelocityFn, interpolant: Interpolant = LinearPath(), **settings) -> "FlowSDE":
        """The SDE of a velocity function on `interpolant`, its score from the velocity (SiT's conversion)."""

        def both(x, t, **cond):
            velocity = velocity_fn(x, t, **cond)
            return velocity, interpolant.score_from_velocity(velocity, x, t)

        return cls(both, interpolant, **settings)

    def diffusion(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """w(t) shaped to broadcast over x; t of shape (N,)."""
        return self.interpolant.diffusion(t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype), self.diffusion_form,
                                          self.diffusion_norm)

    def drift(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        velocity, score = self.velocity_and_score(x, t, **cond)
        return velocity + self.diffusion(t, x) * score

    def last_step(self, kind: str, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, **cond) -> torch.Tensor:
        """SiT's last steps from the grid's last time t to 1, no noise drawn: "mean" the drift alone (the
        mean of an Euler–Maruyama step), "euler" the velocity alone (an ODE step), "tweedie" the
        posterior mean of the data, E[x1 | x_t] = (x + σ² s) / α; "none" leaves x where the grid ended."""
        if kind == "mean":
            return x + self.drift(x, t, **cond) * dt
        if kind == "euler":
            return x + self.velocity_and_score(x, t, **cond)[0] * dt
        if kind == "tweedie":
            return self.interpolant.data_from_score(self.velocity_and_score(x, t, **cond)[1], x, t)
        return x


def _check_last_step(times: torch.Tensor, last_step: str) -> None:
    if last_step not in LAST_STEPS:
        raise UserError(f"unknown SDE last step {last_step!r}; choose one of: {', '.join(LAST_STEPS)}")
    if last_step != "none" and times[-1] >= 1:
        raise UserError(
            f"an SDE grid for the {last_step!r} last step must end before 1 (the step covers the rest); "
            f"use time_grid(n, end={1 - SIT_LAST_STEP_SIZE}) or last_step='none'"
        )


def _last_step(sde: FlowSDE, last_step: str, x, times, cond, callback):
    if last_step == "none":
        return x
    t = times[-1]
    x = sde.last_step(last_step, x, _batch(t, x), 1 - t, **cond)
    if callback is not None:
        callback(len(times) - 1, x)
    return x


@torch.no_grad()
def sde_euler(
    sde: FlowSDE, x: torch.Tensor, times: torch.Tensor, *, noise_fn: NoiseFn, cond: dict | None = None,
    last_step: str | None = "mean", callback: Callback | None = None, progress: bool = False,
) -> torch.Tensor:
    """Euler–Maruyama: x ← x + drift(x, t) dt + sqrt(2 w(t) dt) ξ, ξ = noise_fn(x); then the last step
    from times[-1] to 1 (None is "none")."""
    last_step = last_step or "none"
    _check_last_step(times, last_step)
    cond = cond or {}
    for i, (t, t_next) in _steps(times, progress, "SDE Euler"):
        dt = t_next - t
        noise = noise_fn(x)
        t_batch = _batch(t, x)
        x = x + sde.drift(x, t_batch, **cond) * dt + torch.sqrt(2 * sde.diffusion(t_batch, x)) * (noise * torch.sqrt(dt))
        if callback is not None:
            callback(i, x)
    return _last_step(sde, last_step, x, times, cond, callback)


@torch.no_grad()
def sde_heun(
    sde: FlowSDE, x: torch.Tensor, times: torch.Tensor, *, noise_fn: NoiseFn, cond: dict | None = None,
    last_step: str | None = "mean", callback: Callback | None = None, progress: bool = False,
) -> torch.Tensor:
    """SiT's stochastic Heun: add the step's noise first, x̂ = x + sqrt(2 w(t) dt) ξ, then a Heun step
    of the drift from x̂ over [t, t'] (both drifts of the step use x̂'s noise); then the last step. The
    second drift is taken at t', so the grid must end before 1, where no path has a finite score."""
    last_step = last_step or "none"
    _check_last_step(times, last_step)
    if times[-1] >= 1:
        raise UserError("stochastic Heun evaluates the score at the grid's last time, and the score is infinite "
                        "at t = 1: end the grid before 1 (a last step covers the rest)")
    cond = cond or {}
    for i, (t, t_next) in _steps(times, progress, "SDE Heun"):
        dt = t_next - t
        noise = noise_fn(x)
        t_batch, t_next_batch = _batch(t, x), _batch(t_next, x)
        x_hat = x + torch.sqrt(2 * sde.diffusion(t_batch, x)) * (noise * torch.sqrt(dt))
        k1 = sde.drift(x_hat, t_batch, **cond)
        x_pred = x_hat + dt * k1
        k2 = sde.drift(x_pred, t_next_batch, **cond)
        x = x_hat + 0.5 * dt * (k1 + k2)
        if callback is not None:
            callback(i, x)
    return _last_step(sde, last_step, x, times, cond, callback)
