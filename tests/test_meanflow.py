"""MeanFlow (Geng et al. 2025): the DiT's optional time-gap input, the training target against finite
differences in float64, a closed-form case learned and sampled in one step, and the objective's edges."""

import functools
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdit.checkpoint import load_model
from fastdit.errors import UserError
from fastdit.models import DiT, DiTConfig
from fastdit.objectives import TrainingNetwork, build_objective
from fastdit.objectives.meanflow import jvp_of_u, paper_u
from fastdit.sampling import ModelView, SamplingOptions, get_sampler, samplers_for
from fastdit.train.config import TrainConfig
from fastdit.train.loop import train
from fastdit.train.step_noise import draw_step
from test_train import tiny_config
from cli_runner import run_cli

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps
TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
BLOCK_OPTIONS = {
    "official": {},
    "rope": dict(rope=True),
    "qk-norm": dict(qk_norm=True),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "all": dict(rope=True, qk_norm=True, norm="rmsnorm", mlp="swiglu"),
}


@functools.cache
def reference_dit_module():
    """tests/fixtures/reference/dit_before_meanflow.py (its README says what it is)."""
    path = Path(__file__).parent / "fixtures" / "reference" / "dit_before_meanflow.py"
    spec = importlib.util.spec_from_file_location("dit_before_meanflow", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def perturbed(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """adaLN-Zero starts every branch at zero; noise on every trainable weight makes every path count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return model


def inputs(n=4, seed=2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, TINY["in_channels"], 8, 8, generator=generator).to(dtype)
    t = torch.rand(n, generator=generator).to(dtype)
    y = torch.randint(0, TINY["num_classes"], (n,), generator=generator)
    return x, t, y


# ----------------------------------------------------------------------------------------------
# The model: off is today's DiT bit for bit; on adds one embedder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", ["official", "all"])
def test_gap_embedding_off_is_the_dit_before_it_bit_for_bit(blocks):
    # Bitwise equality is justified: both modules run the same operations in the same order on the same
    # numbers in one process (the frozen copy is the file before the change), whatever kernels the CPU picks.
    reference = reference_dit_module()
    torch.manual_seed(0)
    before = reference.DiT(reference.DiTConfig(**TINY, **BLOCK_OPTIONS[blocks]))
    torch.manual_seed(0)
    now = DiT(DiTConfig(**TINY, **BLOCK_OPTIONS[blocks]))
    assert list(now.state_dict()) == list(before.state_dict())
    for key, value in before.state_dict().items():
        assert torch.equal(now.state_dict()[key], value), key
    perturbed(before), perturbed(now)
    x, t, y = inputs()
    drop = torch.tensor([True, False, False, True])
    for train_mode in (False, True):
        before.train(train_mode), now.train(train_mode)
        with torch.no_grad():
            assert torch.equal(now(x, t, y, force_drop_ids=drop), before(x, t, y, force_drop_ids=drop))
            assert torch.equal(now(x, 1000 * t, y), before(x, 1000 * t, y))  # DDPM's 0..999 scale
    with torch.no_grad():
        doubled = torch.cat([x[:2], x[:2]]), t, torch.cat([y[:2], torch.full((2,), 10)])
        assert torch.equal(now.forward_with_cfg(*doubled, 4.0), before.forward_with_cfg(*doubled, 4.0))


def test_gap_embedding_on_adds_one_embedder_whose_zero_output_changes_nothing():
    torch.manual_seed(0)
    off = perturbed(DiT(DiTConfig(**TINY))).eval()
    on = DiT(DiTConfig(**TINY, time_gap_embedding=True)).eval()  # eval: no random label dropout
    gap_keys = ["gap_embedder.mlp.0.weight", "gap_embedder.mlp.0.bias", "gap_embedder.mlp.2.weight", "gap_embedder.mlp.2.bias"]
    assert sorted(on.state_dict()) == sorted([*off.state_dict(), *gap_keys])
    # With its last layer at zero the gap adds exactly 0.0 to t's embedding: the same numbers as off.
    state = {**on.state_dict(), **off.state_dict()}
    state["gap_embedder.mlp.2.weight"].zero_()
    state["gap_embedder.mlp.2.bias"].zero_()
    on.load_state_dict(state, strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(on(x, t, y, gap=torch.rand(4)), off(x, t, y))
    with pytest.raises(ValueError, match="pass gap=t - r"):
        on(x, t, y)
    with pytest.raises(ValueError, match="call it without gap"):
        off(x, t, y, gap=t)
    with pytest.raises(UserError, match="time_gap_embedding must be true or false"):
        DiTConfig(**TINY, time_gap_embedding="yes")


# ----------------------------------------------------------------------------------------------
# Derivatives in float64 against central differences
# ----------------------------------------------------------------------------------------------


def central_difference(f, h):
    return (f(h) - f(-h)) / (2 * h)


def difference_bound(f, h, rounding_ops=1e3):
    """(the central difference at h/2, a bound on its error). Truncation: the error of a central
    difference is c h² + O(h⁴), so D(h) − D(h/2) = 3 c (h/2)² and the error of D(h/2) is a third of
    that; twice it covers the O(h⁴) rest. Rounding: each evaluation of f is off by at most
    `rounding_ops` ulps of its largest value (a generous count of the float64 operations one output
    passes through in these tiny networks), divided by the step h/2 of the difference."""
    coarse, fine = central_difference(f, h), central_difference(f, h / 2)
    scale = max(f(0.0).abs().max().item(), 1.0)
    return fine, (2 / 3) * (coarse - fine).abs() + rounding_ops * EPS64 * scale / (h / 2)


@pytest.mark.parametrize("blocks", sorted(BLOCK_OPTIONS))
def test_jvp_of_the_network_matches_central_differences(blocks):
    torch.manual_seed(0)
    network = perturbed(DiT(DiTConfig(**TINY, **BLOCK_OPTIONS[blocks], time_gap_embedding=True))).double().eval()
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(3, 3, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    # A generic direction (not only MeanFlow's (v, 0, 1)): every input's derivative is checked.
    tangents = (torch.randn(z.shape, generator=generator, dtype=torch.float64),
                torch.randn(3, generator=generator, dtype=torch.float64),
                torch.randn(3, generator=generator, dtype=torch.float64))
    with torch.no_grad():
        _, derivative = jvp_of_u(network, z, r, t, tangents, y=y)
        along = lambda h: paper_u(network, z + h * tangents[0], r + h * tangents[1], t + h * tangents[2], y=y)
        expected, bound = difference_bound(along, 1e-4)
    assert derivative.abs().max() > 1e-3  # the derivative is not trivially zero
    assert bound.max() < 1e-7 * derivative.abs().max()  # the check is sharp, not vacuous
    assert ((derivative - expected).abs() <= bound).all(), ((derivative - expected).abs() / bound).max()


TARGET_MODES = {
    "guided": dict(meanflow_omega=1.5, meanflow_kappa=0.3),
    "v-loss": dict(meanflow_omega=1.5, meanflow_kappa=0.3, meanflow_v_loss=True),
    "guidance-input": dict(meanflow_guidance_input=True, meanflow_omega_max=3.0),
    "guidance-input, v-loss": dict(meanflow_guidance_input=True, meanflow_omega_max=3.0, meanflow_v_loss=True),
}


@pytest.mark.parametrize("mode", sorted(TARGET_MODES))
def test_target_matches_a_float64_finite_difference_construction_in_flow_time(mode):
    """The target built a second way: in fastdit's own flow time s (0 noise) with the network as it is,
    net(z, s, gap=h) = the average of dz/ds over [s, s + h]. Differentiating h u = ∫ v along the path at
    fixed end s + h gives u = v + h d/ds u (the paper's identity with its time reversed), where along the
    path z moves by w ds, s by ds and the gap by −ds. The paper's target is then minus
    ṽ_s + h d/ds u, with the guided velocity ṽ_s = −ṽ built from the network at gap 0 and the label or
    the null class, and w = ṽ_s (MeanFlow) or the network's own velocity at gap 0 (the v-loss). With the
    guidance as an input, each sample has its own ω (1 for the dropped label) and ∅ is fed ω = 1."""
    settings = TARGET_MODES[mode]
    objective = build_objective("meanflow", **settings)
    with_input = objective.meanflow_guidance_input
    torch.manual_seed(0)
    network = perturbed(DiT(DiTConfig(**TINY, **BLOCK_OPTIONS["all"], time_gap_embedding=True,
                                      guidance_embedding=with_input))).double().eval()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.8, 0.6, 0.35, 0.9], dtype=torch.float64)  # the paper's time (1 = noise)
    r = torch.tensor([0.1, 0.6, 0.2, 0.4], dtype=torch.float64)  # sample 2 has r = t: flow matching
    y, dropped = torch.tensor([2, 5, 8, 3]), torch.tensor([False, False, True, False])
    kwargs = {"y": y, "force_drop_ids": dropped}
    omega = torch.tensor([2.5, 1.7, 1.0, 1.2], dtype=torch.float64)  # a dropped label trains ω = 1
    if with_input:
        kwargs["guidance"] = omega
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise  # the paper's z_t = fastdit's z_s, s = 1 − t
    with torch.no_grad():
        target = objective.target(network, z, r, t, noise - x, kwargs)

        s, gap, zero = 1 - t, t - r, torch.zeros(4, dtype=torch.float64)

        def net(z_, s_, gap_, drop, scale=None):
            extra = {"guidance": scale} if with_input else {}
            return network(z_, s_, y=y, force_drop_ids=drop, gap=gap_, **extra)[:, :3]
        v_s = x - noise  # dz/ds of the sample's own path
        if with_input:
            unconditional = net(z, s, zero, torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.float64))
            w = omega.view(-1, 1, 1, 1)
            guided = w * v_s + (1 - w) * unconditional
        else:
            conditional = net(z, s, zero, torch.zeros(4, dtype=torch.bool))
            unconditional = net(z, s, zero, torch.ones(4, dtype=torch.bool))
            guided = 1.5 * v_s + 0.3 * conditional + (1 - 1.5 - 0.3) * unconditional
            guided = torch.where(dropped.view(-1, 1, 1, 1), v_s, guided)
        scale = omega if with_input else None
        direction = net(z, s, zero, dropped, scale) if objective.meanflow_v_loss else guided
        along = lambda h: net(z + h * direction, s + h, gap - h, dropped, scale)
        derivative, bound = difference_bound(along, 1e-4)
        expected = -(guided + gap.view(-1, 1, 1, 1) * derivative)
        bound = gap.view(-1, 1, 1, 1) * bound  # the difference enters the target times the gap
    # Rounding beside the differences' bound: the network's outputs (the guidance's are taken on a doubled
    # batch there, one at a time here; the JVP on the r ≠ t rows only) as `difference_bound` counts them,
    # 1e3 ulps of the largest.
    rounding = 1e3 * EPS64 * expected.abs().max()
    assert ((target[1] + guided[1]).abs() <= rounding).all()  # r = t: the target is the guided velocity itself
    assert bound.max() < 1e-7 * target.abs().max()  # the check is sharp, not vacuous
    assert ((target - expected).abs() <= bound + rounding).all(), ((target - expected).abs() / (bound + rounding)).max()


def test_the_jvp_on_the_r_ne_t_rows_gives_the_whole_batchs_targets(monkeypatch):
    """The JVP runs on the samples with r ≠ t only (FSDP runs it on all): the targets agree within
    float32 rounding of the network's outputs (a batch's rows are computed alike, but not bit for bit
    across batch sizes): the same 1e3 ulps of the largest value as above, in float32."""
    from fastdit.objectives import meanflow

    objective = build_objective("meanflow", meanflow_omega=2.0)
    torch.manual_seed(0)
    network = perturbed(DiT(DiTConfig(**TINY, time_gap_embedding=True))).eval()
    x, _, y = inputs(n=6)
    noise = torch.randn_like(x)
    t = torch.tensor([0.8, 0.6, 0.35, 0.9, 0.5, 0.7])
    r = torch.tensor([0.1, 0.6, 0.35, 0.4, 0.5, 0.2])  # three with r = t
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    kwargs = {"y": y, "force_drop_ids": torch.zeros(6, dtype=torch.bool)}
    calls = []
    jvp = meanflow.jvp_of_u
    monkeypatch.setattr(meanflow, "jvp_of_u", lambda network, z, *a, **k: (calls.append(len(z)), jvp(network, z, *a, **k))[1])
    subset = objective.target(network, z, r, t, noise - x, kwargs)
    rows = [1, 2, 4]
    at_t = {"y": y[rows], "force_drop_ids": kwargs["force_drop_ids"][rows]}
    target = objective.target(network, z[rows], t[rows], t[rows], (noise - x)[rows], at_t)
    assert calls == [3]  # all r = t: no JVP at all, and the target is the guided velocity
    assert torch.equal(target, objective.guided_velocity(network, z[rows], t[rows], (noise - x)[rows], at_t))
    whole = objective.target(network, z, r, t, noise - x, kwargs, whole_batch=True)
    assert calls == [3, 6]
    assert ((subset - whole).abs() <= 1e3 * EPS32 * whole.abs().max()).all()


# ----------------------------------------------------------------------------------------------
# A closed-form case: Gaussian data, whose flow map is affine
# ----------------------------------------------------------------------------------------------

MEAN, STD = 1.5, 0.5  # data x ~ N(MEAN, STD²) per coordinate; the noise is N(0, 1)


def gaussian_average_velocity(z, s, gap):
    """In flow time s (0 noise): z_s = s x + (1 − s) ε has mean s MEAN and std σ_s = sqrt(s² STD² + (1 − s)²),
    and the probability-flow ODE maps z_s to z_s' = s' MEAN + (σ_s'/σ_s)(z_s − s MEAN) (a Gaussian moves
    by its mean and scale). The average velocity over [s, s + gap] is (z_s' − z_s) / gap; at gap 0 it is the
    velocity MEAN + (z_s − s MEAN) σ_s'/σ_s with σ_s' = dσ/ds = (s STD² − (1 − s)) / σ_s."""
    s, gap = s.view(-1, 1, 1, 1), gap.view(-1, 1, 1, 1)
    sigma = lambda u: torch.sqrt(u**2 * STD**2 + (1 - u) ** 2)
    end = s + gap
    safe_gap = torch.where(gap > 0, gap, torch.ones_like(gap))
    average = ((end - s) * MEAN + (sigma(end) / sigma(s) - 1) * (z - s * MEAN)) / safe_gap
    velocity = MEAN + (z - s * MEAN) * (s * STD**2 - (1 - s)) / sigma(s) ** 2
    return torch.where(gap > 0, average, velocity)


def analytic_network(z, s, y, gap):
    return gaussian_average_velocity(z, s, gap)


@pytest.mark.parametrize("num_steps", [1, 3])
def test_meanflow_sampler_with_the_true_average_velocity_lands_on_the_ode_endpoint(num_steps):
    objective = build_objective("meanflow")
    sampler = get_sampler("meanflow", objective)
    noise = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    view = ModelView(objective, analytic_network, torch.zeros(64, dtype=torch.long), learn_sigma=False)
    calls = []
    counting = lambda x, t, y, gap: calls.append(1) or analytic_network(x, t, y, gap)
    view.model_fn = counting
    out = sampler.run(view, noise, num_steps=num_steps, noise_fn=None, progress=False)
    assert len(calls) == num_steps  # one model call a step
    # The ODE from s = 0 to 1 maps ε to MEAN + STD ε, and the jumps compose exactly. In float32 a step
    # rounds a handful of times (the σ ratio, the products and sums of the update) values no larger than
    # |MEAN| + max |ε|: 8 ulps of that a step bound the error.
    scale = abs(MEAN) + noise.abs().max().item()
    assert (out - (MEAN + STD * noise)).abs().max() <= num_steps * 8 * EPS32 * scale


class AffineAverageVelocity(torch.nn.Module):
    """net(z, s, y, gap=h) = a(s, h) z + b(s, h) m: the family that holds the Gaussian's exact average
    velocity (a = (σ_s'/σ_s − 1)/h, b m = MEAN (1 − s a)), with a and b a small MLP of (s, h) and m a
    learned image. It follows DiT's call contract, so the objective trains it as it trains a DiT."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                       torch.nn.SiLU(), torch.nn.Linear(64, 2))
        self.image = torch.nn.Parameter(torch.zeros(1, 3, 8, 8))

    def forward(self, z, s, y=None, force_drop_ids=None, gap=None):
        a, b = self.mlp(torch.stack([s, gap], dim=-1)).unbind(-1)
        return a.view(-1, 1, 1, 1) * z + b.view(-1, 1, 1, 1) * self.image


@pytest.fixture(scope="module")
def trained_affine():
    """The objective, with the paper's settings, trains the affine family on the Gaussian: its draws (a
    pool of 32,768 from `draw_step`, drawn once, then minibatches of it: drawing per sample each step
    would take most of the time), its loss and its JVP, with Adam decaying linearly to 0."""
    objective = build_objective("meanflow")
    pool, batch, steps = 32768, 256, 4000
    draws = draw_step(0, 0, global_batch=pool, rank=0, local_batch=pool, shape=(3, 8, 8), objective=objective,
                      dropout_prob=0.0, with_latent_noise=False, device=torch.device("cpu")).objective
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only wait on each other's threads on a busy CPU
    try:
        torch.manual_seed(0)
        network = AffineAverageVelocity()
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
        generator = torch.Generator().manual_seed(6)
        for _ in range(steps):
            pick = torch.randint(0, pool, (batch,), generator=generator)
            x = MEAN + STD * torch.randn(batch, 3, 8, 8, generator=generator)
            terms = objective.losses(TrainingNetwork.of(network), x, {name: value[pick] for name, value in draws.items()},
                                     {"y": torch.zeros(batch, dtype=torch.long)})
            optimizer.zero_grad()
            terms["loss"].mean().backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    return objective, network.eval()


def test_training_recovers_the_gaussian_average_velocity(trained_affine):
    objective, network = trained_affine
    z = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    for s, gap in [(0.5, 0.0), (0.2, 0.5), (0.0, 1.0), (0.3, 0.7)]:
        s_, gap_ = torch.full((64,), s), torch.full((64,), gap)
        with torch.no_grad():
            learned, exact = network(z, s_, gap=gap_), gaussian_average_velocity(z, s_, gap_)
            velocity = gaussian_average_velocity(z, s_, torch.zeros(64))
        error = ((learned - exact).norm() / exact.norm()).item()
        # Not rounding but the fit's error: within 5% of u. Where the gap matters, a model that ignored it
        # (the velocity at s, flow matching's answer) misses by 16% to 49% here, at least 3 times that.
        if gap > 0:
            assert ((velocity - exact).norm() / exact.norm()).item() > 3 * 0.05
        assert error < 0.05, (s, gap, error)


def test_one_step_sampling_of_the_trained_model_lands_on_the_analytic_endpoint(trained_affine):
    objective, network = trained_affine
    noise = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    view = ModelView(objective, lambda x, t, y, gap: network(x, t, y, gap=gap), torch.zeros(256, dtype=torch.long),
                     learn_sigma=False)
    out = get_sampler(objective.sampling.sampler, objective).run(view, noise, num_steps=1, noise_fn=None, progress=False)
    exact = MEAN + STD * noise
    # What one step of the instantaneous velocity would give: v(z, 0) = MEAN − z, so z + v = MEAN, every
    # sample on the data mean, off by STD ε (an RMS error of STD). The learned average velocity must
    # remove 90% of that error.
    flow_matching_endpoint = noise + gaussian_average_velocity(noise, torch.zeros(256), torch.zeros(256))
    assert torch.allclose(flow_matching_endpoint, torch.full_like(noise, MEAN), atol=1e-5)
    rms = (out - exact).pow(2).mean().sqrt().item()
    assert rms < 0.1 * STD, rms


# ----------------------------------------------------------------------------------------------
# The objective's edges: settings, samplers, guidance, loading
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    (dict(meanflow_ratio=1.5), "--meanflow-ratio must be in [0, 1], got 1.5"),
    (dict(meanflow_time_std=0.0), "--meanflow-time-std must be > 0, got 0.0"),
    (dict(meanflow_c=0.0), "--meanflow-c must be > 0 (it keeps the weight finite), got 0.0"),
    (dict(meanflow_p=-1.0), "--meanflow-p must be >= 0"),
    (dict(meanflow_kappa=1.0), "--meanflow-kappa must be in [0, 1), got 1.0"),
    (dict(meanflow_omega=0.5), "guides with scale omega / (1 - kappa) = 0.5 < 1, away from the class; raise omega"),
    (dict(meanflow_time_mean=math.nan), "--meanflow-time-mean must be finite, got nan"),
])
def test_settings_out_of_range_are_one_line_errors(settings, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_objective("meanflow", **settings)


def test_defaults_are_the_papers_and_guidance_is_trained_in_only_when_asked():
    objective = build_objective("meanflow")
    assert (objective.meanflow_ratio, objective.meanflow_time_mean, objective.meanflow_time_std) == (0.25, -0.4, 1.0)
    assert (objective.meanflow_p, objective.meanflow_c, objective.meanflow_omega, objective.meanflow_kappa) == (1.0, 1e-3, 1.0, 0.0)
    assert objective.trained_guidance is None
    assert build_objective("meanflow", meanflow_omega=1.0, meanflow_kappa=0.5).trained_guidance == 2.0
    with pytest.raises(UserError, match="--meanflow-omega applies to the meanflow objective"):
        build_objective("flow", meanflow_omega=2.0)
    with pytest.raises(UserError, match="needs the null class: set --class-dropout-prob > 0"):
        tiny_config("unused", objective="meanflow", meanflow_omega=2.0, class_dropout_prob=0.0).validate()


def test_draws_follow_the_papers_time_sampler():
    objective = build_objective("meanflow")
    draws = draw_step(0, 0, global_batch=4000, rank=0, local_batch=4000, shape=(1, 2, 2), objective=objective,
                      dropout_prob=0.0, with_latent_noise=False, device=torch.device("cpu"))
    t, r = draws.objective["t"], draws.objective["r"]
    assert (r <= t).all() and ((t > 0) & (t < 1)).all()
    apart = (r < t).float().mean().item()
    # A binomial share of 0.25 over 4,000 samples has std sqrt(0.25 · 0.75 / 4000) = 0.0068: 5 std is 0.035.
    assert abs(apart - 0.25) < 0.035
    # The larger of two logit-normal draws: P(t <= 0.5) = P(both logits -0.4 + n <= 0) = Φ(0.4)², within
    # 5 binomial std.
    p = (0.5 * (1 + math.erf(0.4 / math.sqrt(2)))) ** 2
    assert abs((t <= 0.5).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / 4000)


def test_the_meanflow_sampler_belongs_to_meanflow_and_counts_one_call_a_step():
    objective = build_objective("meanflow")
    assert samplers_for(objective) == ("meanflow",) and "meanflow" not in samplers_for("flow")
    SamplingOptions(num_steps=1, cfg_scale=1.0).validate(objective)  # one step is allowed here
    with pytest.raises(UserError, match=r"number of sampling steps must be in \[2, 1000\], got 1"):
        SamplingOptions(sampler="euler", num_steps=1).validate(build_objective("flow"))
    with pytest.raises(UserError, match="sampler 'meanflow' does not fit this flow model"):
        SamplingOptions(sampler="meanflow").validate(build_objective("flow"))
    guided = build_objective("meanflow", meanflow_omega=3.0)
    with pytest.raises(UserError, match=r"has its guidance trained in \(scale 3\): sample it with --cfg-scale 1, not 4"):
        SamplingOptions(num_steps=1).validate(guided)


def test_sampling_guidance_of_an_unguided_meanflow_model_carries_the_gap():
    """A MeanFlow model trained without guidance may be guided when sampled: the wrapper passes the gap
    with its rows, on the doubled batch and on the rows inside a guidance interval."""
    from fastdit.sampling import ClassifierFreeGuidance

    torch.manual_seed(0)
    network = perturbed(DiT(DiTConfig(**TINY, time_gap_embedding=True))).eval()
    x, t, y = inputs()
    gap = torch.tensor([0.1, 0.2, 0.3, 0.4])
    null = torch.full_like(y, 10)
    with torch.no_grad():
        guided = ClassifierFreeGuidance(network, 2.0, 10, 3)(x, t, y, gap=gap)
        expected = network(x, t, null, gap=gap) + 2.0 * (network(x, t, y, gap=gap) - network(x, t, null, gap=gap))
        torch.testing.assert_close(guided[:, :3], expected[:, :3], rtol=1e-5, atol=1e-5)
        t = torch.tensor([0.1, 0.9, 0.1, 0.9])
        partly = ClassifierFreeGuidance(network, 2.0, 10, 3, interval=(0.5, 1.0))(x, t, y, gap=gap)
        cond, uncond = network(x, t, y, gap=gap), network(x, t, null, gap=gap)
        torch.testing.assert_close(partly[0::2], cond[0::2], rtol=1e-5, atol=1e-5)  # outside: conditional
        torch.testing.assert_close(partly[1::2, :3], (uncond + 2.0 * (cond - uncond))[1::2, :3], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def meanflow_export(tmp_path_factory):
    return train(tiny_config(tmp_path_factory.mktemp("meanflow"), max_steps=2, ckpt_every=2, objective="meanflow",
                             meanflow_omega=2.0, meanflow_kappa=0.25))


def test_a_trained_meanflow_model_records_itself_and_samples_in_one_call(meanflow_export, tmp_path, capsys):
    model, info = load_model(meanflow_export.export)
    assert info.objective == build_objective("meanflow", meanflow_omega=2.0, meanflow_kappa=0.25)
    assert model.config.time_gap_embedding and "gap_embedder.mlp.0.weight" in model.state_dict()
    out = tmp_path / "grid.png"
    assert run_cli("sample", "--ckpt", meanflow_export.export, "--num-sampling-steps", 1, "--cfg-scale", 1,
                   "--class-labels", 1, 2, "--out", out, "--no-progress") == 0
    assert "meanflow 1 step," in capsys.readouterr().out and out.is_file()
    # No flag: the export's recorded recipe (one MeanFlow step at cfg 1), said on the first line.
    assert run_cli("sample", "--ckpt", meanflow_export.export, "--class-labels", 1, 2, "--out", out, "--no-progress") == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("settings from the checkpoint's recipe") and "sampler meanflow, num_steps 1, cfg_scale 1," in first
    assert run_cli("sample", "--ckpt", meanflow_export.export, "--cfg-scale", 4, "--out", out) == 2  # guided twice
    assert "has its guidance trained in (scale 2.66667): sample it with --cfg-scale 1" in capsys.readouterr().err
    npz = tmp_path / "samples.npz"
    assert run_cli("sample-ddp", "--ckpt", meanflow_export.export, "--out", npz, "--num-fid-samples", 3,
                   "--num-sampling-steps", 1, "--cfg-scale", 1, "--batch-size", 2, "--no-progress") == 0
    assert np.load(npz)["arr_0"].shape == (3, 8, 8, 3)


def test_the_demo_runs_meanflow_end_to_end_with_one_call_per_image(tmp_path):
    out = tmp_path / "demo"
    assert run_cli("demo", "--objective", "meanflow", "--out", out, "--steps", 2, "--batch-size", 16,
                   "--samples-per-class", 2, "--classifier-epochs", 1, "--no-repa", "--no-progress") == 0
    sampling = json.loads((out / "report.json").read_text())["sampling"]
    assert (sampling["sampler"], sampling["num_steps"], sampling["cfg_scale"], sampling["trained_guidance"]) == \
        ("meanflow", 1, 1.0, 3.0)


def test_loading_checks_the_network_against_its_objective(meanflow_export):
    from safetensors.torch import load_file

    from fastdit.checkpoint import _shape_fields, check_network_fits
    from fastdit.model_info import ModelInfo

    # A plain state dict (no record) shows its gap embedder in its keys.
    assert _shape_fields(load_file(str(meanflow_export.export)))["time_gap_embedding"] is True
    _, info = load_model(meanflow_export.export)
    with pytest.raises(UserError, match=r"'w.pt' holds a network with time_gap_embedding=True, which a flow model "
                                        r"does not have \(time_gap_embedding=False\); pass --objective meanflow"):
        check_network_fits(ModelInfo(config=info.config, objective=build_objective("flow")), "w.pt")
    with pytest.raises(UserError, match="time_gap_embedding=False, which a meanflow model does not have .*; it is no "
                                        "meanflow network"):
        check_network_fits(ModelInfo(config=DiTConfig(**TINY), objective=build_objective("meanflow")), "w.pt")


def test_the_demo_samples_meanflow_in_one_call_with_its_guidance_trained_in():
    from fastdit.demo.run import DemoConfig, train_config

    config = DemoConfig(objective="meanflow", repa=False)
    assert config.sampling() == ("meanflow", 1)
    objective = train_config(config).build_objective()
    assert objective.meanflow_omega == config.cfg_scale and objective.trained_guidance == config.cfg_scale
    assert isinstance(train_config(DemoConfig(objective="ddpm", repa=False)), TrainConfig)  # no flow-only setting


# ----------------------------------------------------------------------------------------------
# Improved MeanFlow: the guidance scale as an input, sampled in one call
# ----------------------------------------------------------------------------------------------


def test_guidance_input_settings_and_their_errors():
    objective = build_objective("meanflow", meanflow_guidance_input=True, meanflow_omega_max=3.0)
    assert objective.guidance_input == (1.0, 3.0) and objective.trained_guidance is None
    assert objective.network() == {"time_gap_embedding": True, "guidance_embedding": True}
    assert build_objective("meanflow").network()["guidance_embedding"] is False
    with pytest.raises(UserError, match="--meanflow-guidance-input draws the guidance scale per sample"):
        build_objective("meanflow", meanflow_guidance_input=True, meanflow_omega=2.0)
    with pytest.raises(UserError, match=r"--meanflow-omega-max must be >= 1, got 0.5"):
        build_objective("meanflow", meanflow_omega_max=0.5)
    SamplingOptions(num_steps=1, cfg_scale=2.5).validate(objective)
    with pytest.raises(UserError, match=r"trained for guidance scales in \[1, 3\]; pick --cfg-scale in that range, not 4"):
        SamplingOptions(num_steps=1, cfg_scale=4.0).validate(objective)
    with pytest.raises(UserError, match="a guidance interval does not apply to MeanFlow"):
        SamplingOptions(num_steps=1, cfg_scale=2.0, guidance_interval=(0.0, 0.5)).validate(objective)


def test_draws_add_a_uniform_guidance_scale_last():
    plain, with_input = build_objective("meanflow"), build_objective("meanflow", meanflow_guidance_input=True,
                                                                    meanflow_omega_max=3.0)
    kwargs = dict(global_batch=2000, rank=0, local_batch=2000, shape=(1, 2, 2), dropout_prob=0.0,
                  with_latent_noise=False, device=torch.device("cpu"))
    a, b = draw_step(0, 0, objective=plain, **kwargs), draw_step(0, 0, objective=with_input, **kwargs)
    for name in ("t", "r", "noise"):  # the option's draw comes after the others
        assert torch.equal(a.objective[name], b.objective[name]), name
    omega = b.objective["omega"]
    assert omega.shape == (2000,) and ((omega >= 1) & (omega <= 3)).all()
    # Uniform on [1, 3]: mean 2, std 2/√12 = 0.577; the mean of 2,000 is within 5 · 0.577/√2000 = 0.065.
    assert abs(omega.mean().item() - 2.0) < 0.065


def test_a_guidance_input_network_is_sampled_in_one_call_with_the_scale_fed_in():
    from fastdit.sampling import PerImageNoise, sample_latents

    objective = build_objective("meanflow", meanflow_guidance_input=True, meanflow_omega_max=3.0)
    torch.manual_seed(0)
    network = perturbed(DiT(DiTConfig(**TINY, **objective.network()))).eval()
    assert "guidance_embedder.mlp.0.weight" in network.state_dict()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="pass guidance="):
        network(x, t, y, gap=t)
    calls = []
    network.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["guidance"].clone()),
                                  with_kwargs=True)
    labels = torch.tensor([1, 2, 3])
    samples = sample_latents(network, labels, objective=objective, options=SamplingOptions(num_steps=1, cfg_scale=2.5),
                             noise=PerImageNoise(0, range(3)))
    assert len(calls) == 1 and torch.equal(calls[0], torch.full((3,), 2.5))  # one call, the scale as the input
    noise = PerImageNoise(0, range(3)).draw((3, 8, 8))
    with torch.no_grad():  # one jump from flow time 0 (noise) to 1 (data): x + u(x, 0, gap 1)
        expected = noise + network(noise, torch.zeros(3), labels, gap=torch.ones(3), guidance=torch.full((3,), 2.5))[:, :3]
    torch.testing.assert_close(samples, expected, rtol=0, atol=0)


def test_a_bf16_target_is_as_accurate_as_the_bf16_prediction_it_trains():
    """Under a bf16 autocast the JVP runs in bf16 (forward-mode AD through autocast's casts). Its target
    must be no less accurate than the bf16 forward of u that the loss compares with it: both relative
    errors against float64 are bf16 roundings (unit 2^-8) accumulated through the same network (measured
    on this model: 1.1% for the target, 2.1% for u); the bound allows 1.5x the forward's error."""
    objective = build_objective("meanflow", meanflow_omega=2.0)
    torch.manual_seed(0)
    network = perturbed(DiT(DiTConfig(**{**TINY, "hidden_size": 128, "depth": 4, "num_heads": 4},
                                      time_gap_embedding=True))).eval()
    generator = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 16, 3, 8, 8, generator=generator)
    t = torch.rand(16, generator=generator)
    r = t * torch.rand(16, generator=generator)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    kwargs = {"y": torch.randint(0, 10, (16,), generator=generator), "force_drop_ids": torch.zeros(16, dtype=torch.bool)}
    with torch.no_grad():
        double = network.double()
        exact_target = objective.target(double, z.double(), r.double(), t.double(), (noise - x).double(), kwargs)
        exact_u = paper_u(double, z.double(), r.double(), t.double(), **kwargs)
        network.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            target = objective.target(network, z, r, t, noise - x, kwargs)
            u = paper_u(network, z, r, t, **kwargs)
    relative = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    assert torch.isfinite(target).all()
    assert 1e-4 < relative(target, exact_target) <= 1.5 * relative(u, exact_u)  # bf16 indeed, and no worse


def test_the_meanflow_demo_trains_without_repa_unless_asked():
    from fastdit.demo.run import DemoConfig

    assert DemoConfig(objective="meanflow").repa is False and DemoConfig().repa is True
    assert DemoConfig(objective="meanflow", repa=True).repa is True
