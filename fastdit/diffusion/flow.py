"""Flow matching on SiT's interpolant paths, with velocity, noise or score prediction: the training
objective of SiT (Ma et al. 2024, "Scalable Interpolant Transformers"; Lipman et al. 2023; Liu et al.
2023; Albergo & Vanden-Eijnden 2023).

Time follows SiT: t in [0, 1], **t = 0 is pure noise, t = 1 is data**, and the network embeds the
real t (DiT's sinusoidal embedding accepts real numbers). A path mixes data x1 and noise x0 ~ N(0, I),

    x_t = α_t · x1 + σ_t · x0,        u_t = dx_t/dt = α̇_t · x1 + σ̇_t · x0,

with SiT's three paths (its `transport/path.py`, SiT paper section 3):

    linear   α_t = t,                 σ_t = 1 − t                 (SiT's default, "Linear")
    gvp      α_t = sin(πt/2),         σ_t = cos(πt/2)             (generalised variance preserving)
    vp       α_t = exp(−¼(1−t)²(β₁−β₀) − ½(1−t)β₀),  σ_t = sqrt(1 − α_t²),  β₀ = 0.1, β₁ = 20
                                                                  (the VP SDE of Song et al. 2021)

The network predicts one of three things about x_t, each an affine function of the others at fixed
(x_t, t) (SiT section 3.2):

    velocity  v = u_t's expectation                    loss mean((v̂ − u_t)²)
    noise     ε = x0's expectation                     loss mean(w · (ε̂ − x0)²)
    score     s = ∇ log p_t(x_t) = −E[x0 | x_t] / σ_t  loss mean(w · (ŝ σ_t + x0)²)

with the weight w of SiT's `--loss-weight`: 1 ("none"), (b_t / σ_t)² ("velocity") or b_t / σ_t²
("likelihood"), where v = a_t x + b_t s links velocity and score (`Interpolant.score_coefficients`).
The linear path with velocity prediction is what the released SiT-XL/2 was trained with.

Near the ends of [0, 1] some of these conversions divide by zero (σ_1 = 0 for the score of a noise
model, α̇/α = 1/t at t = 0 for the linear path), so SiT trains and samples noise and score models,
and every VP model, on a slightly shorter interval: `train_eps`, `sample_eps` and `time_interval` give
SiT's choices (its `create_transport` and `Transport.check_interval`).

Model contract: `model(x_t, t, **model_kwargs) -> (N, C or 2C, H, W)`; the prediction is the first C
channels. A network built with learn_sigma=True (as the released SiT-XL/2 is) has 2C outputs and
SiT's forward drops the second half, which therefore gets no gradient.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import UserError
from .losses import mean_flat

TIME_SAMPLINGS = ("uniform", "logit-normal")
PATH_TYPES = ("linear", "gvp", "vp")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
# SiT's diffusion forms w(t) of the sampling SDE (`ICPlan.compute_diffusion`; SiT spells one of them
# "inccreasing-decreasing" in the code and "increasing-decreasing" in its flags).
DIFFUSION_FORMS = ("constant", "sbdm", "sigma", "linear", "decreasing", "increasing-decreasing")
# SiT's ends of the interval for models that need them (`create_transport`): VP trains on [0, 1 − 1e-5]
# and samples up to 1 − 1e-3; noise and score models on the linear and GVP paths use [1e-3, 1 − 1e-3].
VP_TRAIN_EPS, VP_SAMPLE_EPS = 1e-5, 1e-3
NON_VELOCITY_EPS = 1e-3


def velocity_channels(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The prediction part of a network output for input `x`: its first C channels (of C or 2C)."""
    C = x.shape[1]
    if output.shape[1] not in (C, 2 * C):
        raise ValueError(f"a velocity model must output {C} or {2 * C} channels, got {output.shape[1]}")
    return output[:, :C]


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t of shape (N,) (or a scalar) as (N, 1, ..., 1), to broadcast over x."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The paths
# ----------------------------------------------------------------------------------------------


class Interpolant:
    """A path x_t = α_t x1 + σ_t x0. Coefficients take t already shaped to broadcast over x (`_like`)
    and are computed in t's dtype, as SiT computes them."""

    name = ""

    def alpha(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, α̇_t)."""
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ_t, σ̇_t)."""
        raise NotImplementedError

    def alpha_rate(self, t: torch.Tensor) -> torch.Tensor:
        """α̇_t / α_t, in a form that stays accurate where α_t is small."""
        raise NotImplementedError

    def score_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, b_t) with v = a_t x + b_t s for the velocity v and score s at x_t = x: differentiating
        x_t, v = (α̇/α) x + ((α̇/α) σ² − σ σ̇) s (SiT's `compute_drift`: −drift_mean = a x, drift_var = b)."""
        rate = self.alpha_rate(t)
        sigma, d_sigma = self.sigma(t)
        return rate, rate * sigma**2 - sigma * d_sigma

    # -- conversions between predictions (affine in the prediction at fixed x, t) -----------------

    def velocity_from_score(self, score: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.score_coefficients(_like(t, x))
        return a * x + b * score

    def score_from_velocity(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s = (α/α̇ · v − x) / (σ² − α/α̇ · σ̇ σ), SiT's `get_score_from_velocity` (v = a x + b s solved
        for s, with α/α̇ written as the ratio of α and α̇ themselves, as SiT does)."""
        t = _like(t, x)
        alpha, d_alpha = self.alpha(t)
        sigma, d_sigma = self.sigma(t)
        ratio = alpha / d_alpha
        return (ratio * velocity - x) / (sigma**2 - ratio * d_sigma * sigma)

    def score_from_noise(self, noise: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s = −ε / σ_t: the score of x_t given x1 is −x0 / σ_t, and E[x0 | x_t] is ε."""
        return noise / -self.sigma(_like(t, x))[0]

    def data_from_score(self, score: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Tweedie's formula, E[x1 | x_t = x] = (x + σ² s) / α, in SiT's order (x/α + σ²/α · s)."""
        t = _like(t, x)
        alpha, sigma = self.alpha(t)[0], self.sigma(t)[0]
        return x / alpha + sigma**2 / alpha * score

    def data_from_velocity(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x1 | x_t = x] from the velocity: x = α x1 + σ x0 and v = α̇ x1 + σ̇ x0 solved for x1,
        (σ̇ x − σ v) / (σ̇ α − σ α̇); finite wherever the path moves (the determinant is never 0)."""
        t = _like(t, x)
        alpha, d_alpha = self.alpha(t)
        sigma, d_sigma = self.sigma(t)
        return (d_sigma * x - sigma * velocity) / (d_sigma * alpha - sigma * d_alpha)

    # -- the path itself and the sampling SDE's diffusion ----------------------------------------

    def interpolate(self, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = α_t x1 + σ_t x0, t of shape (N,)."""
        t = _like(t, x1)
        return self.alpha(t)[0] * x1 + self.sigma(t)[0] * x0

    def target_velocity(self, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """u_t = α̇_t x1 + σ̇_t x0."""
        t = _like(t, x1)
        return self.alpha(t)[1] * x1 + self.sigma(t)[1] * x0

    def diffusion(self, t: torch.Tensor, form: str, norm: float) -> torch.Tensor:
        """w(t) of the sampling SDE dx = [v + w s] dt + sqrt(2w) dW (SiT's `compute_diffusion`): every
        such SDE has the probability-flow ODE's marginals, w only trades drift for noise."""
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "sbdm":  # the diffusion of the score-based model's reverse SDE: w = b_t
            return norm * self.score_coefficients(t)[1]
        if form == "sigma":
            return norm * self.sigma(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * t) ** 2
        raise UserError(f"unknown diffusion form {form!r}; choose one of: {', '.join(DIFFUSION_FORMS)}")


class LinearPath(Interpolant):
    """α_t = t, σ_t = 1 − t (SiT's `ICPlan`)."""

    name = "linear"

    def alpha(self, t):
        return t, torch.ones_like(t)

    def sigma(self, t):
        return 1 - t, -torch.ones_like(t)

    def alpha_rate(self, t):
        return 1 / t


class GVPPath(Interpolant):
    """α_t = sin(πt/2), σ_t = cos(πt/2): α² + σ² = 1 at every t (SiT's `GVPCPlan`)."""

    name = "gvp"

    def alpha(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def alpha_rate(self, t):
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(Interpolant):
    """The VP SDE's marginals in flow time (SiT's `VPCPlan`): log α_t = −¼(1−t)²(β₁−β₀) − ½(1−t)β₀, the
    integral of β(s)/2 for β(s) = β₀ + s(β₁ − β₀) over the diffusion time s = 1 − t; σ_t² = 1 − α_t²."""

    name = "vp"
    beta_min, beta_max = 0.1, 20.0

    def _log_alpha(self, t):
        return -0.25 * ((1 - t) ** 2) * (self.beta_max - self.beta_min) - 0.5 * (1 - t) * self.beta_min

    def _d_log_alpha(self, t):
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def alpha(self, t):
        alpha = torch.exp(self._log_alpha(t))
        return alpha, alpha * self._d_log_alpha(t)

    def sigma(self, t):
        alpha_squared = torch.exp(2 * self._log_alpha(t))
        sigma = torch.sqrt(1 - alpha_squared)
        return sigma, alpha_squared * (2 * self._d_log_alpha(t)) / (-2 * sigma)

    def alpha_rate(self, t):
        return self._d_log_alpha(t)

    def score_coefficients(self, t):
        # With σ² = 1 − α², a = α̇/α and b = a σ² − σ σ̇ = a (σ² + α²) = a = β_t / 2 (SiT writes it so).
        beta = self.beta_min + (1 - t) * (self.beta_max - self.beta_min)
        return beta / 2, beta / 2


PATHS: dict[str, Interpolant] = {path.name: path for path in (LinearPath(), GVPPath(), VPPath())}


def interpolant(name: str) -> Interpolant:
    if name not in PATHS:
        raise UserError(f"unknown flow path {name!r}; choose one of: {', '.join(PATH_TYPES)}")
    return PATHS[name]


def train_eps(path: str, prediction: str) -> float:
    """SiT's `train_eps` (`create_transport` without --train-eps)."""
    if path == "vp":
        return VP_TRAIN_EPS
    return NON_VELOCITY_EPS if prediction != "velocity" else 0.0


def sample_eps(path: str, prediction: str) -> float:
    """SiT's `sample_eps` (`create_transport` without --sample-eps)."""
    if path == "vp":
        return VP_SAMPLE_EPS
    return NON_VELOCITY_EPS if prediction != "velocity" else 0.0


def time_interval(path: str, prediction: str, *, training: bool = False, sde: bool = False,
                  diffusion_form: str = "sigma", last_step_size: float = 0.0) -> tuple[float, float]:
    """The (t0, t1) SiT trains on or samples over (`Transport.check_interval`): VP stops short of 1; noise
    and score models on the linear and GVP paths stay `eps` away from both ends, velocity models there
    use all of [0, 1] for training and the ODE; an SDE stops at 1 − last_step_size (its last step covers
    the rest; 1 − eps without one) and starts at eps for the SBDM diffusion, infinite at t = 0."""
    eps = train_eps(path, prediction) if training else sample_eps(path, prediction)
    end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    if path == "vp":
        return 0.0, end
    if prediction != "velocity" or sde:
        start = eps if (sde and diffusion_form == "sbdm") or prediction != "velocity" else 0.0
        return start, end
    return 0.0, 1.0


class VelocityModel:
    """A DiT (or SiT checkpoint) as a velocity function: `model(x, t, y)` with real t in [0, 1],
    keeping the first C output channels, as SiT's forward does for learn_sigma=True. fastdit's DiT
    embeds a real t exactly as SiT does (the sinusoidal features of t itself; no cast to integers)."""

    def __init__(self, model: Callable):
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return velocity_channels(self.model(x, t, y), x)


class FlowMatching:
    """The flow-matching process on one of SiT's paths with one of its predictions: training loss and
    time sampling (module docstring).

    `time_sampling` "uniform" draws t ~ U[0, 1) as SiT does; "logit-normal" draws
    t = sigmoid(mean + std · n), n ~ N(0, 1) (Esser et al. 2024, SD3, section 3.1, eq. 19). SD3's time
    runs the other way (its t = 1 is noise), so SD3's lognorm(m, s) is `mean = −m` here; mean 0 is
    the same in both, and puts most samples at intermediate times. Where SiT trains on a shorter
    interval [t0, t1] (`time_interval`), the draw is mapped onto it, t0 + (t1 − t0) t, as SiT does.
    """

    def __init__(self, time_sampling: str = "uniform", logit_normal_mean: float = 0.0, logit_normal_std: float = 1.0,
                 *, path: str = "linear", prediction: str = "velocity", loss_weight: str = "none"):
        if time_sampling not in TIME_SAMPLINGS:
            raise UserError(f"unknown time sampling {time_sampling!r}; choose one of: {', '.join(TIME_SAMPLINGS)}")
        if not logit_normal_std > 0:
            raise UserError(f"logit-normal std must be > 0, got {logit_normal_std}")
        if prediction not in PREDICTIONS:
            raise UserError(f"unknown prediction {prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
        if loss_weight not in LOSS_WEIGHTS:
            raise UserError(f"unknown loss weight {loss_weight!r}; choose one of: {', '.join(LOSS_WEIGHTS)}")
        if loss_weight != "none" and prediction == "velocity":
            # SiT ignores the weight for velocity models; taking it would train something else than asked.
            raise UserError(f"a {loss_weight} loss weight applies to noise and score prediction only (SiT weighs "
                            "those), not to velocity prediction")
        self.time_sampling = time_sampling
        self.logit_normal_mean = float(logit_normal_mean)
        self.logit_normal_std = float(logit_normal_std)
        self.interpolant = interpolant(path)
        self.prediction = prediction
        self.loss_weight = loss_weight
        self.train_interval = time_interval(path, prediction, training=True)

    # ------------------------------------------------------------------------------------------
    # the path
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The linear path's x_t = t · x1 + (1 − t) · x0, t of shape (N,)."""
        t = t.reshape(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
        return t * x1 + (1 - t) * x0

    @staticmethod
    def target_velocity(x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The linear path's u_t = x1 − x0, the same at every t."""
        return x1 - x0

    def sample_times(
        self, n: int, device: torch.device | str = "cpu", dtype=torch.float32, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.time_sampling == "uniform":
            t = torch.rand(n, device=device, dtype=dtype, generator=generator)
        else:
            normal = torch.randn(n, device=device, dtype=dtype, generator=generator)
            t = torch.sigmoid(self.logit_normal_mean + self.logit_normal_std * normal)
        start, end = self.train_interval
        return t if (start, end) == (0.0, 1.0) else t * (end - start) + start

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------

    def loss(
        self,
        model: Callable,
        x1: torch.Tensor,
        model_kwargs: dict | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-sample loss of the prediction at x_t (module docstring); the linear path with velocity
        prediction is mean((v(x_t, t) − (x1 − x0))²). `t` and the noise x0 are drawn from `generator`
        (t first, as `GaussianDiffusion.loss` does) unless given."""
        if t is None:
            t = self.sample_times(x1.shape[0], x1.device, x1.dtype, generator)
        if noise is None:
            noise = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        linear = self.interpolant.name == "linear"
        x_t = self.interpolate(x1, noise, t) if linear else self.interpolant.interpolate(x1, noise, t)
        prediction = velocity_channels(model(x_t, t, **(model_kwargs or {})), x_t)
        if self.prediction == "velocity":
            target = self.target_velocity(x1, noise) if linear else self.interpolant.target_velocity(x1, noise, t)
            return mean_flat((prediction - target) ** 2)
        sigma = self.interpolant.sigma(_like(t, x_t))[0]
        weight = self.weight(t, x_t)
        if self.prediction == "noise":
            return mean_flat(weight * (prediction - noise) ** 2)
        return mean_flat(weight * (prediction * sigma + noise) ** 2)  # score: ŝ σ_t estimates −x0

    def weight(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
        """SiT's loss weight of a noise or score model: 1, (b_t / σ_t)² or b_t / σ_t² (module docstring)."""
        if self.loss_weight == "none":
            return 1
        t = _like(t, x)
        b = self.interpolant.score_coefficients(t)[1]
        sigma = self.interpolant.sigma(t)[0]
        return (b / sigma) ** 2 if self.loss_weight == "velocity" else b / (sigma**2)
