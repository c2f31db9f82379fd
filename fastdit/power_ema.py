"""Power-function EMA profiles and their post-hoc combination (EDM2: Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", Sec. 3 and App. C).

A power-function EMA with exponent γ averages the weights θ_1 … θ_t of the first t optimizer steps as

    θ̂_t = β(t) θ̂_{t−1} + (1 − β(t)) θ_t,    β(t) = (1 − 1/t)^(γ+1)                   (EDM2 eq. 2)

so β(1) = 0 (the first average is θ_1) and the average's length grows with t instead of being a fixed
number of steps. Unrolled, the weight of θ_τ in θ̂_t telescopes to

    w_τ = (1 − β(τ)) Π_{s=τ+1..t} β(s) = (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1),

which is exactly the integral over [τ−1, τ] of the continuous profile

    p_{t,γ}(τ) = (γ+1) τ^γ / t^(γ+1)   on 0 < τ ≤ t                                     (EDM2 eq. 3)

The profile's standard deviation relative to t is EDM2's σ_rel (below). Averages with any other σ_rel,
at any step, are linear combinations Σ_i x_i θ̂_i of stored snapshots θ̂_i = (t_i, γ_i): the weights
x minimise the L2 distance between Σ_i x_i p_i and the wanted profile, a least-squares problem whose
inner products ⟨p_i, p_j⟩ are closed-form (App. C.3). Because every discrete weight w_τ is the
integral of its profile over one unit cell, the fit's L2 residual r bounds the error of the
combination: per coordinate, |Σ_τ e_τ θ_τ| ≤ ‖e‖₂ ‖θ‖₂ with e_τ = ∫_{τ−1}^{τ} r, and ‖e‖₂ ≤ ‖r‖_{L2}
(Jensen on each unit cell). Everything here is float64 NumPy; nothing knows about models or files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError

# σ_rel(γ)² = (γ+1) / ((γ+2)² (γ+3)) rises from 0 at γ = −1 to a peak and falls as ~1/γ² after it.
# d/dγ log σ_rel² = 1/(γ+1) − 2/(γ+2) − 1/(γ+3) = 0  ⇔  γ² + 3γ + 1 = 0, so the peak is at
# γ = (√5 − 3)/2 ≈ −0.382, where σ_rel ≈ 0.300. Each σ_rel below the peak has two γ; EDM2 uses the
# larger (the profile that weighs recent steps most), so γ is searched on [GAMMA_AT_PEAK, ∞).
GAMMA_AT_PEAK = (math.sqrt(5.0) - 3.0) / 2.0


def sigma_rel_of_gamma(gamma: float) -> float:
    """σ_rel of the profile p(τ) ∝ τ^γ on [0, t], divided by t (EDM2 eq. 3; derived from its moments:
    mean t(γ+1)/(γ+2), second moment t²(γ+1)/(γ+3), so variance t²(γ+1)/((γ+2)²(γ+3)))."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


SIGMA_REL_MAX = sigma_rel_of_gamma(GAMMA_AT_PEAK)  # ≈ 0.3003


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The γ ≥ GAMMA_AT_PEAK whose profile has this σ_rel: σ_rel² (γ+2)²(γ+3) = γ+1 (EDM2 eq. 3, App.
    C.2 solves the same cubic), found by bisection, since σ_rel(γ) falls monotonically on that branch."""
    if not (isinstance(sigma_rel, (int, float)) and 0.0 < sigma_rel <= SIGMA_REL_MAX):
        raise UserError(f"σ_rel must be in (0, {SIGMA_REL_MAX:.4f}] (the longest power-function EMA), got {sigma_rel!r}; "
                        f"EDM2 uses 0.05 to 0.15")
    low, high = GAMMA_AT_PEAK, 1.0
    while sigma_rel_of_gamma(high) > sigma_rel:  # σ_rel ≈ 1/γ for large γ: a few doublings at most
        low, high = high, 2.0 * high
    for _ in range(200):  # until the interval stops shrinking in float64
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if sigma_rel_of_gamma(middle) > sigma_rel:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def power_ema_decay(step: int, gamma: float) -> float:
    """β(t) of the update after optimizer step `step` = t ≥ 1 (EDM2 eq. 2)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(steps_a, gammas_a, steps_b, gammas_b) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_{t_a,γ_a} p_{t_b,γ_b} dτ for every pair (broadcast like NumPy arrays):

        (γ_a+1)(γ_b+1) / (γ_a+γ_b+1) · t_min^(γ_a+γ_b+1) / (t_a^(γ_a+1) t_b^(γ_b+1))     (EDM2 App. C.3)

    written as ratios (t_min/t_a)^(γ_a+1) (t_min/t_b)^(γ_b+1) / t_min so that large γ and t cannot
    overflow float64."""
    t_a, g_a = np.asarray(steps_a, dtype=np.float64), np.asarray(gammas_a, dtype=np.float64)
    t_b, g_b = np.asarray(steps_b, dtype=np.float64), np.asarray(gammas_b, dtype=np.float64)
    t_min = np.minimum(t_a, t_b)
    return ((g_a + 1) * (g_b + 1) / (g_a + g_b + 1)
            * (t_min / t_a) ** (g_a + 1) * (t_min / t_b) ** (g_b + 1) / t_min)


@dataclass(frozen=True)
class ProfileFit:
    """The least-squares combination of stored profiles that best matches a wanted one."""

    weights: np.ndarray  # x_i, one per stored snapshot
    residual: float  # ‖Σ x_i p_i − p‖ in L2 (per unit step^(1/2)); bounds the error as the module says
    target_norm: float  # ‖p‖, so residual / target_norm is the fit's relative error

    @property
    def relative_error(self) -> float:
        return self.residual / self.target_norm


def fit_profile(snapshot_steps, snapshot_gammas, step: int, gamma: float) -> ProfileFit:
    """Weights x minimising ‖Σ_i x_i p_{t_i,γ_i} − p_{step,γ}‖ (EDM2 App. C.3): the normal equations
    A x = b with A_ij = ⟨p_i, p_j⟩ and b_i = ⟨p_i, p⟩, solved by SVD least squares, since profiles of
    neighbouring snapshots are nearly parallel and A is close to singular."""
    t = np.asarray(snapshot_steps, dtype=np.float64)
    g = np.asarray(snapshot_gammas, dtype=np.float64)
    gram = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
    wanted = profile_inner_products(t, g, step, gamma)
    weights = np.linalg.lstsq(gram, wanted, rcond=None)[0]
    target = float(profile_inner_products(step, gamma, step, gamma))
    # ‖r‖² = ⟨p,p⟩ − 2 xᵀb + xᵀAx; rounding can take it a hair below zero when the fit is exact.
    squared = target - 2.0 * weights @ wanted + weights @ gram @ weights
    return ProfileFit(weights=weights, residual=math.sqrt(max(float(squared), 0.0)), target_norm=math.sqrt(target))
