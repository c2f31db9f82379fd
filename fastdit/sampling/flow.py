"""Samplers for flow-matching models (SiT), as pure functions over a time grid.

Contract: `velocity_fn(x, t, **cond) -> v` with t of shape (N,) in [0, 1], t = 0 noise, t = 1 data
(`fastdit.diffusion.flow`). Every sampler takes the start noise `x` (at times[0]) and an increasing
`times` grid (`time_grid`), and returns the state at times[-1] (after the SDE's last step, at 1).
`callback(i, x)` receives the state after step i. Fresh noise comes from `noise_fn(x)`, so that the
caller can seed it per image (`fastdit.sampling.noise.PerImageNoise`). `mean_flow_steps` takes
MeanFlow's average velocity `u(x, t, t', **cond)` instead of v.

The conventions are those of SiT's `transport` package (Ma et al. 2024): ODE grids are
`linspace(0, 1, num_points)` (SiT's `num_steps` is the number of points); SDE grids stop at
1 − last_step_size and a drift-only "Mean" step goes the rest of the way to 1.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..diffusion.flow import VelocityModel  # noqa: F401  (re-exported)
from ..errors import UserError
from ..objectives.views import shift_times, time_grid  # noqa: F401  (re-exported)
from ..program import install_command
from ..progress import tqdm

VelocityFn = Callable[..., torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor], None]

# SiT's default SDE last step: the grid ends at 1 − 0.04 and the "Mean" step covers the rest.
SIT_LAST_STEP_SIZE = 0.04
LAST_STEPS = ("mean", None)


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


def _diffusion(t: torch.Tensor, diffusion_norm: float) -> torch.Tensor:
    # SiT's "sigma" diffusion form: w(t) = norm · σ_t = norm · (1 − t).
    return diffusion_norm * (1 - t)


def _sde_drift(velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor, diffusion_norm: float) -> torch.Tensor:
    # v + w(t) · score. For x_t = α_t x1 + σ_t x0 both v and the score are affine in E[x0 | x_t], so
    # score = (α_t/α̇_t · v − x) / (σ_t² − α_t/α̇_t · σ̇_t σ_t) (SiT's conversion); on the linear path
    # (α_t = t, σ_t = 1 − t) that is (t v − x) / (1 − t). The (1 − t) of the "sigma" form cancels,
    # leaving v + norm · (t v − x), which stays finite at t = 1.
    return velocity + diffusion_norm * (t * velocity - x)


def _check_sde_options(times: torch.Tensor, diffusion_norm: float, last_step: str | None) -> None:
    if diffusion_norm < 0:
        raise UserError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    if last_step not in LAST_STEPS:
        raise UserError(f"unknown SDE last step {last_step!r}; choose 'mean' or None")
    if last_step == "mean" and times[-1] >= 1:
        raise UserError(
            f"an SDE grid for the 'mean' last step must end before 1 (it covers the rest); "
            f"use time_grid(n, end={1 - SIT_LAST_STEP_SIZE}) or last_step=None"
        )


def _mean_last_step(velocity_fn, x, times, cond, diffusion_norm):
    # SiT's "Mean" last step: the drift alone, from the grid's last time to 1 (no noise added).
    t = times[-1]
    return x + _sde_drift(velocity_fn(x, _batch(t, x), **cond), x, t, diffusion_norm) * (1 - t)


@torch.no_grad()
def sde_euler(
    velocity_fn: VelocityFn, x: torch.Tensor, times: torch.Tensor, *, noise_fn: NoiseFn, cond: dict | None = None,
    diffusion_norm: float = 1.0, last_step: str | None = "mean", callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Euler–Maruyama: x ← x + drift(x, t) dt + sqrt(2 w(t) dt) ξ, ξ = noise_fn(x); then the last step."""
    _check_sde_options(times, diffusion_norm, last_step)
    cond = cond or {}
    for i, (t, t_next) in _steps(times, progress, "SDE Euler"):
        dt = t_next - t
        noise = noise_fn(x)
        drift = _sde_drift(velocity_fn(x, _batch(t, x), **cond), x, t, diffusion_norm)
        x = x + drift * dt + torch.sqrt(2 * _diffusion(t, diffusion_norm)) * (noise * torch.sqrt(dt))
        if callback is not None:
            callback(i, x)
    if last_step == "mean":
        x = _mean_last_step(velocity_fn, x, times, cond, diffusion_norm)
        if callback is not None:
            callback(len(times) - 1, x)
    return x


@torch.no_grad()
def sde_heun(
    velocity_fn: VelocityFn, x: torch.Tensor, times: torch.Tensor, *, noise_fn: NoiseFn, cond: dict | None = None,
    diffusion_norm: float = 1.0, last_step: str | None = "mean", callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """SiT's stochastic Heun: add the step's noise first, x̂ = x + sqrt(2 w(t) dt) ξ, then a Heun step
    of the drift from x̂ over [t, t'] (both drifts of the step use x̂'s noise); then the last step."""
    _check_sde_options(times, diffusion_norm, last_step)
    cond = cond or {}
    for i, (t, t_next) in _steps(times, progress, "SDE Heun"):
        dt = t_next - t
        noise = noise_fn(x)
        x_hat = x + torch.sqrt(2 * _diffusion(t, diffusion_norm)) * (noise * torch.sqrt(dt))
        k1 = _sde_drift(velocity_fn(x_hat, _batch(t, x), **cond), x_hat, t, diffusion_norm)
        x_pred = x_hat + dt * k1
        k2 = _sde_drift(velocity_fn(x_pred, _batch(t_next, x), **cond), x_pred, t_next, diffusion_norm)
        x = x_hat + 0.5 * dt * (k1 + k2)
        if callback is not None:
            callback(i, x)
    if last_step == "mean":
        x = _mean_last_step(velocity_fn, x, times, cond, diffusion_norm)
        if callback is not None:
            callback(len(times) - 1, x)
    return x
