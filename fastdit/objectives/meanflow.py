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

**The JVP apart from the trained forward.** The target is stop-gradient, so its JVP runs under
`torch.no_grad` through the step's target forward (`TrainingNetwork.target`: the plain module, the same
weights, outside DDP's gradient hooks), and the trained u is one ordinary forward through the step's
network, whose backward DDP reduces. Per step that is the JVP (a primal and a tangent pass, no
activations kept: about 3 forwards' work, since the tangent pass also multiplies the weights' zero
tangents) on top of a flow step's forward and backward (about 3 forwards), plus one no-grad forward when ω ≠ 1 (two when κ ≠ 0). The released code instead
backpropagates through the JVP's primal output and saves that forward; a forward-mode transform
through DDP's hooks (gradient-reduction bookkeeping, buffer broadcasts) is not something this code
relies on. Scaled-dot-product attention has no forward-mode rule in any of its fused kernels (PyTorch 2.13:
the CPU's flash kernel and CUDA's flash, memory-efficient and cuDNN kernels all raise "Trying to use
forward AD with ... that does not support it"), so the JVP runs attention on SDPA's math path, which
differentiates op by op; the trained forward keeps the fused kernels.

**The JVP only where it counts.** At r = t the factor (t − r) is 0 and the target is ṽ itself, so the
JVP runs on the samples drawn with r ≠ t only (a quarter at the paper's ratio): the same targets, at a
quarter of the JVP's work. Where every process must run the same forwards (`TrainingNetwork.whole_batch`:
FSDP gathers the sharded weights in each one), the JVP runs on the whole batch.

**Improved MeanFlow** (Geng, Lu, Wu, Shechtman, Kolter & He 2025, "Improved Mean Flows: On the
Challenges of Fastforward Generative Models", arXiv 2512.02012), two options, off by default:
* `--meanflow-v-loss` (their section 3). The loss is written on the instantaneous velocity,
  ‖u_θ(z, r, t) + (t − r) sg(du/dt) − ṽ‖², with the total derivative taken along the network's own
  velocity u_θ(z, t, t) instead of the sampled ṽ (whose noise ε − x the JVP would carry through the
  Jacobian). With the stop-gradient this is the loss above with the tangent (u_θ(z, t, t), 0, 1):
  the same code, one more no-grad forward (on the r ≠ t samples).
* `--meanflow-guidance-input` (their section 4). The guidance scale ω is an input of the network
  (`DiTConfig.guidance_embedding`), drawn per labelled sample uniformly in [1, ω_max] (the draw's law
  is ours; the paper conditions on a range too) with the target ṽ = ω v + (1 − ω) u_θ(z, t, t | ∅, ω = 1):
  one network for every scale, which sampling picks with --cfg-scale, still in one call. Samples whose
  label was dropped train ω = 1, where ṽ = v. The paper feeds its conditions as in-context tokens;
  here ω's embedding is added to t's, as the gap's is.
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
from .policy import SamplingPolicy


def paper_u(network, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """The network as the paper's u(z, r, t): times (N,) in the paper's convention (1 = noise, r <= t),
    u pointing from data to noise. The one place the two time conventions meet (module docstring)."""
    return -velocity_channels(network(z, 1 - t, gap=t - r, **model_kwargs), z)


def jvp_of_u(network, z, r, t, tangents, **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(u(z, r, t), its derivative along `tangents` = (dz, dr, dt)) in forward mode (`torch.func.jvp`),
    with attention on SDPA's math path: its fused kernels have no forward-mode rule (module docstring)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(lambda z_, r_, t_: paper_u(network, z_, r_, t_, **model_kwargs), (z, r, t), tangents)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@register_objective
@dataclass
class MeanFlow(Objective):
    name: ClassVar[str] = "meanflow"
    summary: ClassVar[str] = "MeanFlow: the average velocity over [r, t], sampled in one step"
    time_range: ClassVar[tuple[float, float]] = (0.0, 1.0)  # the network's (and samplers') flow time
    flow_time: ClassVar[bool] = True
    views: ClassVar[frozenset[str]] = frozenset({"average-velocity"})
    network_options: ClassVar[dict] = {"time_gap_embedding": True, "guidance_embedding": False}

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
    meanflow_v_loss: bool = setting(False, "meanflow: improved MeanFlow's v-loss (arXiv 2512.02012, section 3): the "
                                           "derivative is taken along the network's own velocity u(z, t, t), not the "
                                           "noisy sampled one")
    meanflow_guidance_input: bool = setting(False, "meanflow: improved MeanFlow's guidance as an input (section 4): "
                                                   "train every scale in [1, --meanflow-omega-max] into one network and "
                                                   "pick one with --cfg-scale when sampling (instead of --meanflow-omega)")
    meanflow_omega_max: float = setting(4.0, "meanflow: with --meanflow-guidance-input, the largest guidance scale "
                                             "trained (omega uniform in [1, this])")

    def validate(self) -> None:
        checks = [
            ("--meanflow-ratio", self.meanflow_ratio, 0 <= self.meanflow_ratio <= 1, "in [0, 1]"),
            ("--meanflow-time-mean", self.meanflow_time_mean, math.isfinite(self.meanflow_time_mean), "finite"),
            ("--meanflow-time-std", self.meanflow_time_std, self.meanflow_time_std > 0, "> 0"),
            ("--meanflow-p", self.meanflow_p, self.meanflow_p >= 0, ">= 0 (0: the plain squared error)"),
            ("--meanflow-c", self.meanflow_c, self.meanflow_c > 0, "> 0 (it keeps the weight finite)"),
            ("--meanflow-omega", self.meanflow_omega, self.meanflow_omega > 0, "> 0"),
            ("--meanflow-kappa", self.meanflow_kappa, 0 <= self.meanflow_kappa < 1, "in [0, 1)"),
            ("--meanflow-omega-max", self.meanflow_omega_max, self.meanflow_omega_max >= 1, ">= 1"),
        ]
        for flag, value, ok, rule in checks:
            if not (math.isfinite(value) and ok):
                raise UserError(f"{flag} must be {rule}, got {value}")
        self._refuse_settings_that_do_nothing()
        if self.meanflow_guidance_input and (self.meanflow_omega != 1 or self.meanflow_kappa != 0):
            raise UserError(f"--meanflow-guidance-input draws the guidance scale per sample, up to --meanflow-omega-max; "
                            f"leave --meanflow-omega at 1 and --meanflow-kappa at 0 (got {self.meanflow_omega:g} "
                            f"and {self.meanflow_kappa:g})")
        scale = self.meanflow_omega / (1 - self.meanflow_kappa)
        if scale < 1:
            raise UserError(f"--meanflow-omega {self.meanflow_omega:g} with --meanflow-kappa {self.meanflow_kappa:g} "
                            f"guides with scale omega / (1 - kappa) = {scale:g} < 1, away from the class; "
                            f"raise omega to at least 1 - kappa = {1 - self.meanflow_kappa:g}")

    def _refuse_settings_that_do_nothing(self) -> None:
        """A setting that modifies another must come with it, as another objective's settings are refused:
        given alone it would change nothing, silently."""
        defaults = {f.name: f.default for f in self.__dataclass_fields__.values()}
        if self.meanflow_omega_max != defaults["meanflow_omega_max"] and not self.meanflow_guidance_input:
            raise UserError(f"--meanflow-omega-max {self.meanflow_omega_max:g} sets the range of guidance scales that "
                            f"--meanflow-guidance-input trains; pass --meanflow-guidance-input too, or leave it out")
        if self.meanflow_guidance_input and self.meanflow_omega_max == 1:
            raise UserError("--meanflow-guidance-input with --meanflow-omega-max 1 trains the one scale 1 (no guidance), "
                            "so the input would change nothing; pass --meanflow-omega-max > 1 (e.g. 4)")
        if self.meanflow_c != defaults["meanflow_c"] and self.meanflow_p == 0:
            raise UserError(f"--meanflow-c {self.meanflow_c:g} is the constant of the adaptive weight "
                            f"1 / (|delta|^2 + c)^p, which --meanflow-p 0 turns off; pass --meanflow-p > 0, or leave "
                            f"--meanflow-c out")
        if self.meanflow_v_loss and self.meanflow_ratio == 0:
            raise UserError("--meanflow-v-loss changes the target of the samples with r != t, which --meanflow-ratio 0 "
                            "leaves none of; pass --meanflow-ratio > 0 (the paper: 0.25), or leave --meanflow-v-loss out")

    @property
    def trained_guidance(self) -> float | None:
        """The guidance scale ω / (1 − κ) trained into the network; None without one (ω = 1, κ = 0)."""
        if self.meanflow_omega == 1 and self.meanflow_kappa == 0:
            return None
        return self.meanflow_omega / (1 - self.meanflow_kappa)

    @property
    def guidance_input(self) -> tuple[float, float] | None:
        """The range of guidance scales the network takes as an input (improved MeanFlow), or None."""
        return (1.0, self.meanflow_omega_max) if self.meanflow_guidance_input else None

    def network(self) -> dict:
        return {**self.network_options, "guidance_embedding": self.meanflow_guidance_input}

    @property
    def sampling(self) -> SamplingPolicy:
        # One model call: MeanFlow's own setting (Geng et al. 2025: FID 3.43 at 1 call). One MeanFlow step
        # jumps across many times; guiding "where t lies in [a, b]" has no meaning for a jump that starts
        # outside the interval and ends inside it.
        return SamplingPolicy("meanflow", sampler="meanflow", num_steps=1, trained_guidance=self.trained_guidance,
                              guidance_input=self.guidance_input,
                              no_interval="a guidance interval does not apply to MeanFlow, whose steps jump across it")

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
        draws = {
            "t": t,
            "r": torch.where(apart, lower, t),
            "noise": torch.randn((1, *shape), generator=generator, device=device),
        }
        if self.meanflow_guidance_input:  # drawn last: without the option the draws are what they were
            draws["omega"] = 1 + (self.meanflow_omega_max - 1) * torch.rand(1, generator=generator, device=device)
        return draws

    def guided_velocity(self, network, z, t, v, model_kwargs) -> torch.Tensor:
        """ṽ = ω v + κ u(z, t, t | c) + (1 − ω − κ) u(z, t, t | ∅) for labelled samples, v for those whose
        label the loop dropped (section 4.2 and the appendix's mixed form), with no gradient. With the
        guidance as an input, ω is each sample's (ω = 1 for the dropped ones) and κ = 0."""
        omega = model_kwargs.get("guidance")
        if self.trained_guidance is None and omega is None:
            return v
        y, dropped = model_kwargs["y"], model_kwargs.get("force_drop_ids")
        null = torch.ones_like(y, dtype=torch.bool)
        if omega is not None:  # improved MeanFlow: ∅ is unguided, ω = 1
            u_null = paper_u(network, z, t, t, y=y, force_drop_ids=null, guidance=torch.ones_like(omega))
            omega = _per_sample(omega, v)
            return omega * v + (1 - omega) * u_null
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

    def target(self, network, z, r, t, v, conditions, *, whole_batch: bool = False) -> torch.Tensor:
        """u_tgt = ṽ − (t − r) (w ∂_z u + ∂_t u), the total derivative as one JVP with tangent (w, 0, 1)
        on (z, r, t), w = ṽ (section 4.1, Table 1b) or, with the v-loss, the network's u(z, t, t); no
        gradient: it is stop-gradient in the loss. The JVP runs on the samples with r ≠ t (module
        docstring): at r = t the target is ṽ; with `whole_batch` (FSDP: every process runs the same
        forwards) on every sample. `network` is the target forward (`TrainingNetwork.target`)."""
        # In the step's precision: under a bf16 autocast the target's error stays below that of the bf16
        # forward of u it is compared with (tests/test_meanflow.py holds it), so float32 here would buy no
        # accuracy the loss can use.
        with torch.no_grad():
            v_tilde = self.guided_velocity(network, z, t, v, conditions)
            rows = torch.arange(len(t), device=t.device) if whole_batch else (r != t).nonzero().squeeze(1)
            if rows.numel() == 0:
                return v_tilde
            batch = len(t)
            kwargs = {key: value[rows] if torch.is_tensor(value) and value.shape[:1] == (batch,) else value
                      for key, value in conditions.items()}
            z_, r_, t_ = z[rows], r[rows], t[rows]
            tangent = paper_u(network, z_, t_, t_, **kwargs) if self.meanflow_v_loss else v_tilde[rows]
            _, dudt = jvp_of_u(network, z_, r_, t_, (tangent, torch.zeros_like(r_), torch.ones_like(t_)), **kwargs)
            return v_tilde.index_put((rows,), v_tilde[rows] - _per_sample(t_ - r_, dudt) * dudt)

    def losses(self, network, x, draws, conditions):
        t, r, noise = draws["t"], draws["r"], draws["noise"]
        z = (1 - _per_sample(t, x)) * x + _per_sample(t, x) * noise  # the paper's z_t
        v = noise - x  # the paper's conditional velocity dz_t/dt
        if self.meanflow_guidance_input:  # each sample's ω; a dropped label trains the unguided ω = 1
            dropped = conditions.get("force_drop_ids")
            omega = draws["omega"] if dropped is None else torch.where(dropped.bool(), 1.0, draws["omega"])
            conditions = {**conditions, "guidance": omega}
        # The target's no-grad passes (the JVP, the guided field) run through `network.target`: the target
        # is the derivative of the network that sampling will run, on every token (a routed target would be
        # the derivative of a random sub-network, adding the route's noise to the regression target). Their
        # cost stays small: the JVP runs on the r != t samples only (a quarter, the paper's ratio).
        target = self.target(network.target, z, r, t, v, conditions, whole_batch=network.whole_batch)
        # The trained u last, through the step's forward (DDP reduces its gradients; a training extension's
        # capture on a block keeps this forward's tokens, the last it sees).
        u = paper_u(network, z, r, t, **conditions)
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
