"""`meanflow`: one-step generation with average velocities (Geng, Deng, Bai, Kolter & He 2025, "Mean
Flows for One-step Generative Modeling", arXiv 2505.13447).

**Two time conventions, mapped once.** fastdit's flow time s runs from 0 = noise to 1 = data on
z_s = s x + (1 − s) ε (SiT's, `fastdit.diffusion.flow`); the paper's time t runs the other way,
z_t = (1 − t) x + t ε, 1 = noise, with velocity v = ε − x. Everything outside this module speaks
fastdit's time: the network is a DiT with a second time input (`DiTConfig.time_gap_embedding`),

    network(z, s, y, gap=h) = the average of dz/ds over [s, s + h]  (h >= 0, toward data),

so at h = 0 it is the velocity x − ε that SiT's network predicts; the sampler's view (`average_velocity`)
is that network as it is. Training is written in the paper's convention, equation
for equation, through ONE map, `paper_u`: the paper's u(z, r, t) (r <= t, pointing from data to noise) is

    u(z, r, t) = −network(z, s = 1 − t, gap = t − r),

since z_r = z_t − (t − r) u(z_t, r, t) (the paper's definition of u, section 4.1) is the step from
s = 1 − t to s + h = 1 − r. The draws (t, r) and the settings that shape them are in the paper's time
too, so its numbers are used as printed.

**The target** (section 4.1). The average velocity u(z_t, r, t) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ
satisfies the MeanFlow identity u = v − (t − r) du/dt, with the total derivative along the flow
du/dt = v ∂_z u + ∂_t u (∂_r u gets weight dr/dt = 0). Training regresses the network on

    u_tgt = v − (t − r) · jvp(u_θ, (z, r, t), tangent (v, 0, 1)),       loss = sg(w) ‖u_θ(z, r, t) − sg(u_tgt)‖²,

with the adaptive weight w = 1 / (‖Δ‖² + c)^p (section 4.3, Table 1e; p = 1, c = 10⁻³), ‖Δ‖² summed
over the whole sample as the released code does. At r = t the target is v itself: flow matching.

**Guidance trained in** (section 4.2, and the mixed form with κ of the appendix). The labelled
samples regress on the guided field: v is replaced, in the target and in the JVP's tangent, by

    ṽ = ω v + κ u_θ(z_t, t, t | c) + (1 − ω − κ) u_θ(z_t, t, t | ∅),

whose fixed point is the guided velocity of scale ω / (1 − κ); the samples whose label was dropped (the
loop's class dropout, which trains ∅) keep v. Sampling then needs no second forward, and must not guide
again (`trained_guidance`).

**The JVP under DDP.** The target is stop-gradient, so its JVP runs under `torch.no_grad` on the plain
DiT (`DistributedDataParallel.module`; the weights are shared), and the trained u is one ordinary
forward through the step's runnable, whose backward DDP reduces. Per step that is the JVP (a primal
and a tangent pass, no activations kept: about 2 forwards' work) on top of a flow step's forward and
backward (about 3 forwards), plus one no-grad forward when ω ≠ 1 (two when κ ≠ 0). The released code
instead backpropagates through the JVP's primal output and saves that forward; a forward-mode transform
through DDP's hooks (gradient-reduction bookkeeping, buffer broadcasts) is not something this code relies
on. Scaled-dot-product attention has no forward-mode rule in any of its fused kernels (PyTorch 2.13:
the CPU's flash kernel and CUDA's flash, memory-efficient and cuDNN kernels all raise "Trying to use
forward AD with ... that does not support it"), so the JVP runs attention on SDPA's math path, which
differentiates op by op; the trained forward keeps the fused kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..diffusion.flow import velocity_channels
from ..diffusion.losses import mean_flat
from ..errors import UserError
from .base import Objective, register_objective, setting


def paper_u(network, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """The network as the paper's u(z, r, t): times (N,) in the paper's convention (1 = noise, r <= t),
    u pointing from data to noise. The one place the two time conventions meet (module docstring)."""
    return -velocity_channels(network(z, 1 - t, gap=t - r, **model_kwargs), z)


def jvp_of_u(network, z, r, t, tangents, **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(u(z, r, t), its derivative along `tangents` = (dz, dr, dt)) in forward mode (`torch.func.jvp`),
    with attention on SDPA's math path: its fused kernels have no forward-mode rule (module docstring)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(lambda z_, r_, t_: paper_u(network, z_, r_, t_, **model_kwargs), (z, r, t), tangents)


def plain_module(model):
    """The DiT inside what the training step calls: DDP's `.module` (the same weights), else the model
    itself (FSDP2, activation checkpointing and regional compilation all work in place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@register_objective
@dataclass
class MeanFlow(Objective):
    name: ClassVar[str] = "meanflow"
    summary: ClassVar[str] = "MeanFlow: the average velocity over [r, t], sampled in one step"
    time_range: ClassVar[tuple[float, float]] = (0.0, 1.0)  # the network's (and samplers') flow time
    flow_time: ClassVar[bool] = True
    default_sampler: ClassVar[str] = "meanflow"
    default_num_steps: ClassVar[int] = 1  # one model call: MeanFlow's own setting (Geng et al. 2025: FID 3.43 at 1 call)
    views: ClassVar[frozenset[str]] = frozenset({"average-velocity"})
    network_options: ClassVar[dict] = {"time_gap_embedding": True}

    meanflow_ratio: float = setting(0.25, "meanflow: share of samples with r != t, the others r = t, plain flow "
                                          "matching (paper Table 1a: 0.25)")
    meanflow_time_mean: float = setting(-0.4, "meanflow: t and r are sigmoid(m + s n), in the paper's time "
                                              "(1 = noise): mean m (Table 1d: lognorm(-0.4, 1.0))")
    meanflow_time_std: float = setting(1.0, "meanflow: std s of those times (Table 1d: 1.0)")
    meanflow_p: float = setting(1.0, "meanflow: adaptive loss weight 1 / (|delta|^2 + c)^p, the power p "
                                     "(Table 1e: 1.0; 0 is the plain squared error, 0.5 Pseudo-Huber)")
    meanflow_c: float = setting(1e-3, "meanflow: the constant c of that weight (section 4.3: 1e-3)")
    meanflow_omega: float = setting(1.0, "meanflow: guidance trained in, omega of the guided target "
                                         "omega v + kappa u(c) + (1 - omega - kappa) u(null) (section 4.2; 1 with "
                                         "kappa 0: none, as the Table 1 ablations; Table 1f: 3.0)")
    meanflow_kappa: float = setting(0.0, "meanflow: kappa of that target (the paper's appendix); the effective guidance "
                                         "scale is omega / (1 - kappa)")

    def validate(self) -> None:
        checks = [
            ("--meanflow-ratio", self.meanflow_ratio, 0 <= self.meanflow_ratio <= 1, "in [0, 1]"),
            ("--meanflow-time-mean", self.meanflow_time_mean, math.isfinite(self.meanflow_time_mean), "finite"),
            ("--meanflow-time-std", self.meanflow_time_std, self.meanflow_time_std > 0, "> 0"),
            ("--meanflow-p", self.meanflow_p, self.meanflow_p >= 0, ">= 0 (0: the plain squared error)"),
            ("--meanflow-c", self.meanflow_c, self.meanflow_c > 0, "> 0 (it keeps the weight finite)"),
            ("--meanflow-omega", self.meanflow_omega, self.meanflow_omega > 0, "> 0"),
            ("--meanflow-kappa", self.meanflow_kappa, 0 <= self.meanflow_kappa < 1, "in [0, 1)"),
        ]
        for flag, value, ok, rule in checks:
            if not (math.isfinite(value) and ok):
                raise UserError(f"{flag} must be {rule}, got {value}")
        scale = self.meanflow_omega / (1 - self.meanflow_kappa)
        if scale < 1:
            raise UserError(f"--meanflow-omega {self.meanflow_omega:g} with --meanflow-kappa {self.meanflow_kappa:g} "
                            f"guides with scale omega / (1 - kappa) = {scale:g} < 1, away from the class; "
                            f"raise omega to at least 1 - kappa = {1 - self.meanflow_kappa:g}")

    @property
    def trained_guidance(self) -> float | None:
        if self.meanflow_omega == 1 and self.meanflow_kappa == 0:
            return None
        return self.meanflow_omega / (1 - self.meanflow_kappa)

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------

    def draw(self, shape, generator, device):
        """(t, r) in the paper's time: two logit-normal draws, t the larger (the released code's
        max/min); r = t unless a uniform draw falls under the ratio (per sample rather than a fixed
        share of each batch, so a sample's draws do not depend on the batch it is in); then ε."""
        pair = torch.sigmoid(self.meanflow_time_mean + self.meanflow_time_std * torch.randn(2, generator=generator, device=device))
        t, lower = pair.max().reshape(1), pair.min().reshape(1)
        apart = torch.rand(1, generator=generator, device=device) < self.meanflow_ratio
        return {
            "t": t,
            "r": torch.where(apart, lower, t),
            "noise": torch.randn((1, *shape), generator=generator, device=device),
        }

    def guided_velocity(self, network, z, t, v, model_kwargs) -> torch.Tensor:
        """ṽ = ω v + κ u(z, t, t | c) + (1 − ω − κ) u(z, t, t | ∅) for labelled samples, v for those whose
        label the loop dropped (section 4.2 and the appendix's mixed form), with no gradient."""
        if self.trained_guidance is None:
            return v
        y, dropped = model_kwargs["y"], model_kwargs.get("force_drop_ids")
        null = torch.ones_like(y, dtype=torch.bool)
        if self.meanflow_kappa == 0:
            u_null, u_cond = paper_u(network, z, t, t, y=y, force_drop_ids=null), torch.zeros_like(v)
        else:  # both on one doubled batch: the labelled half first
            u_cond, u_null = paper_u(network, torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]),
                                     y=torch.cat([y, y]), force_drop_ids=torch.cat([~null, null])).chunk(2)
        omega, kappa = self.meanflow_omega, self.meanflow_kappa
        guided = omega * v + kappa * u_cond + (1 - omega - kappa) * u_null
        if dropped is None:
            return guided
        return torch.where(_per_sample(dropped, v).bool(), v, guided)

    def target(self, network, z, r, t, v, model_kwargs) -> torch.Tensor:
        """u_tgt = ṽ − (t − r) (ṽ ∂_z u + ∂_t u), the total derivative as one JVP with tangent
        (ṽ, 0, 1) on (z, r, t) (section 4.1, Table 1b); no gradient: it is stop-gradient in the loss."""
        with torch.no_grad():
            v_tilde = self.guided_velocity(network, z, t, v, model_kwargs)
            _, dudt = jvp_of_u(network, z, r, t, (v_tilde, torch.zeros_like(r), torch.ones_like(t)), **model_kwargs)
            return v_tilde - _per_sample(t - r, dudt) * dudt

    def losses(self, model, x, draws, model_kwargs):
        t, r, noise = draws["t"], draws["r"], draws["noise"]
        z = (1 - _per_sample(t, x)) * x + _per_sample(t, x) * noise  # the paper's z_t
        v = noise - x  # the paper's conditional velocity dz_t/dt
        target = self.target(plain_module(model), z, r, t, v, model_kwargs)
        # The trained u last, through the runnable (DDP reduces its gradients; a REPA hook on a block keeps
        # this forward's tokens, the last it sees).
        u = paper_u(model, z, r, t, **model_kwargs)
        delta = u.float() - target.float()
        squared = delta.pow(2).flatten(1).sum(1)  # ‖Δ‖², per sample, as the paper's weight reads it
        weight = (squared.detach() + self.meanflow_c).pow(-self.meanflow_p)
        return {"loss": weight * squared, "mse": mean_flat(delta.detach() ** 2)}

    # ------------------------------------------------------------------------------------------
    # the view samplers consume, in fastdit's flow time
    # ------------------------------------------------------------------------------------------

    def average_velocity(self, model_fn):
        def average_velocity(x, t, t_next, y):
            return velocity_channels(model_fn(x, t, y, gap=t_next - t), x)

        return average_velocity
