"""Flow matching (fastdit.diffusion.flow) and its samplers (fastdit.sampling.flow): behaviour."""

import math
import sys

import pytest
import torch

from fastdit.diffusion import FlowMatching
from fastdit.errors import UserError
from fastdit.objectives import build_objective
from fastdit.models import DiT
from fastdit.sampling import (
    ClassifierFreeGuidance,
    GuidedVelocity,
    VelocityModel,
    get_sampler,
    ode_dopri5,
    ode_euler,
    ode_heun,
    sde_euler,
    sde_heun,
    shift_times,
    time_grid,
)

U = 2.0**-24


def tiny_dit(**overrides):
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5, **overrides)
    for p in model.parameters():  # the official init zeroes the output; give it something to say
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def counting(velocity_fn, calls):
    def wrapped(x, t, y):
        calls.append((len(x), t.tolist()))
        return velocity_fn(x, t, y)

    return wrapped


def elementwise_velocity(x, t, y):
    # A velocity field with no coupling between rows, so that any row's value is its own.
    shape = (-1,) + (1,) * (x.ndim - 1)
    return torch.tanh(x + t.reshape(shape)) * (1 + y.reshape(shape).float())


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def test_loss_uses_the_velocity_half_of_a_learn_sigma_model():
    x1 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.1, 0.5, 0.9])
    velocity = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    variance = torch.full_like(velocity, 100.0)  # must not enter the loss
    loss = FlowMatching().loss(lambda x, t, y: torch.cat([velocity, variance], 1), x1, {"y": None}, t=t, noise=noise)
    expected = ((velocity - (x1 - noise)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected, rtol=4 * U * 64, atol=0)  # a mean of 64 squares, in any order
    with pytest.raises(ValueError, match="4 or 8 channels, got 12"):
        FlowMatching().loss(lambda x, t: torch.zeros(3, 12, 4, 4), x1, t=t, noise=noise)


def test_loss_draws_t_and_noise_from_the_generator():
    model = tiny_dit()
    x1 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    flow = FlowMatching()
    with torch.no_grad():
        drawn = flow.loss(model, x1, {"y": y}, generator=torch.Generator().manual_seed(5))
        again = flow.loss(model, x1, {"y": y}, generator=torch.Generator().manual_seed(5))
        other = flow.loss(model, x1, {"y": y}, generator=torch.Generator().manual_seed(6))
        generator = torch.Generator().manual_seed(5)
        t = torch.rand(2, generator=generator)  # t first, then the noise, as GaussianDiffusion.loss
        noise = torch.randn(x1.shape, generator=generator)
        given = flow.loss(model, x1, {"y": y}, t=t, noise=noise)
    assert torch.equal(drawn, again) and torch.equal(drawn, given)
    assert not torch.equal(drawn, other)


def test_logit_normal_times():
    flow = FlowMatching("logit-normal", logit_normal_mean=-0.5, logit_normal_std=0.8)
    t = flow.sample_times(200_000, generator=torch.Generator().manual_seed(0))
    logits = torch.log(t.double() / (1 - t.double()))
    # logit(t) ~ N(−0.5, 0.8²): the sample mean's standard error is 0.8/sqrt(n) = 0.0018, the sample
    # std's 0.8/sqrt(2n) = 0.0013; 5 standard errors each.
    assert abs(logits.mean().item() + 0.5) < 5 * 0.8 / math.sqrt(200_000)
    assert abs(logits.std().item() - 0.8) < 5 * 0.8 / math.sqrt(400_000)
    uniform = FlowMatching().sample_times(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(uniform.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / 200_000)
    with pytest.raises(UserError, match="unknown time sampling 'lognormal'"):
        FlowMatching("lognormal")
    with pytest.raises(UserError, match="std must be > 0, got 0"):
        FlowMatching("logit-normal", logit_normal_std=0)


# ----------------------------------------------------------------------------------------------
# time grid and shift
# ----------------------------------------------------------------------------------------------


def test_shift_is_sd3s_shift_in_sits_time():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    sigma = 1 - t  # SD3's time: 1 is noise
    for s in (0.5, 3.0):
        sd3 = s * sigma / (1 + (s - 1) * sigma)
        assert torch.allclose(shift_times(t, s), 1 - sd3, rtol=0, atol=1e-15)
    grid = time_grid(10, shift=3.0)
    assert grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()
    assert (grid[1:-1] < time_grid(10)[1:-1]).all()  # s > 1 moves every inner time toward the noise
    assert torch.equal(time_grid(10, shift=1.0), torch.linspace(0, 1, 10))
    with pytest.raises(UserError, match="at least 2 points, got 1"):
        time_grid(1)
    with pytest.raises(UserError, match="time shift must be > 0, got 0"):
        time_grid(5, shift=0)
    with pytest.raises(UserError, match="must end in \\(0, 1\\], got 1.5"):
        time_grid(5, end=1.5)


# ----------------------------------------------------------------------------------------------
# guidance and its interval
# ----------------------------------------------------------------------------------------------


def test_guidance_interval():
    model = VelocityModel(tiny_dit())
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = {"y": torch.tensor([1, 3])}
    times = time_grid(10)  # k/9: no time in (0.45, 0.5)

    def run(velocity_fn):
        return ode_euler(velocity_fn, z, times, cond=cond)

    plain_cfg = run(ClassifierFreeGuidance(model, 3.0, 5, 4))
    assert torch.equal(run(GuidedVelocity(model, 3.0, 5, 4)), plain_cfg)  # the default is everywhere
    assert torch.equal(run(GuidedVelocity(model, 3.0, 5, 4, interval=(0.0, 1.0))), plain_cfg)
    assert torch.equal(run(GuidedVelocity(model, 3.0, 5, 4, interval=(0.45, 0.5))), run(model))
    assert not torch.equal(plain_cfg, run(model))

    calls = []
    run(GuidedVelocity(counting(model, calls), 3.0, 5, 4, interval=(0.5, 1.0)))
    assert len(calls) == 9  # one forward per step, guided or not
    for batch, t in calls:
        assert batch == (4 if t[0] >= 0.5 else 2), (batch, t)  # doubled only inside the interval


def test_guidance_interval_per_row():
    # Rows at different times in one call: the rows inside are guided, the others conditional only.
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.7, 0.9])
    y = torch.tensor([0, 1, 2])
    guided = GuidedVelocity(elementwise_velocity, 2.0, 3, 2, interval=(0.6, 0.8))(x, t, y)
    full = ClassifierFreeGuidance(elementwise_velocity, 2.0, 3, 2)(x, t, y)
    cond = elementwise_velocity(x, t, y)
    # Elementwise kernels may round the last bit differently for another batch shape: 2 ulp of |v| <= 3.
    tol = 2 * 3 * 2**-23
    assert torch.allclose(guided[1], full[1], rtol=0, atol=tol)
    assert torch.allclose(guided[[0, 2]], cond[[0, 2]], rtol=0, atol=tol)
    assert not torch.allclose(full[[0, 2]], cond[[0, 2]], rtol=0, atol=1e-3)


def test_guidance_arguments():
    with pytest.raises(UserError, match="guidance interval \\(0.8, 0.2\\)"):
        GuidedVelocity(elementwise_velocity, 2.0, 3, 2, interval=(0.8, 0.2))
    with pytest.raises(UserError, match="cfg scale 0.5"):
        GuidedVelocity(elementwise_velocity, 0.5, 3, 2)


# ----------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------


def decay(x, t):
    return -x  # dx/dt = −x: x(1) = x(0)·e^−1


@pytest.mark.parametrize("sampler,order", [(ode_euler, 1), (ode_heun, 2)])
def test_ode_samplers_converge_at_their_order(sampler, order):
    x = torch.ones(1, dtype=torch.float64)
    exact = math.exp(-1)
    errors = [abs(sampler(decay, x, torch.linspace(0, 1, n + 1, dtype=torch.float64)).item() - exact) for n in (20, 40)]
    # Halving the step divides a p-th order method's error by ~2^p (to within the next term, O(h)).
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.1)


def test_dopri5():
    pytest.importorskip("torchdiffeq")
    x = torch.ones(3, dtype=torch.float64)
    states = []
    final = ode_dopri5(decay, x, torch.linspace(0, 1, 3, dtype=torch.float64), callback=lambda i, s: states.append(s))
    # Local errors are held to atol + rtol·|x| per step; a handful of steps over [0, 1].
    assert torch.allclose(final, x * math.exp(-1), rtol=1e-3, atol=0)
    # t = 0.5 falls inside a step: it is read from the solver's interpolant, which rtol does not control.
    assert torch.allclose(states[0], x * math.exp(-0.5), rtol=1e-2, atol=0)
    assert len(states) == 2 and torch.equal(states[1], final)


def test_dopri5_without_torchdiffeq_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # makes `import torchdiffeq` fail
    with pytest.raises(UserError, match=r"-m pip install -e '.*\[ode\]'"):
        ode_dopri5(decay, torch.ones(1), time_grid(2))


def test_sde_without_diffusion_is_the_ode():
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    times = time_grid(6)
    ode = ode_euler(decay, z, times)
    never = lambda x: torch.full_like(x, float("nan"))  # noqa: E731  (the option checks come first)
    sde = sde_euler(decay, z, times, noise_fn=lambda x: torch.randn_like(x), diffusion_norm=0.0, last_step=None)
    assert torch.equal(sde, ode)
    with pytest.raises(UserError, match="must end before 1"):
        sde_euler(decay, z, times, noise_fn=never)
    with pytest.raises(UserError, match="unknown SDE last step 'tweedie'"):
        sde_heun(decay, z, time_grid(6, end=0.9), noise_fn=never, last_step="tweedie")


def gaussian_velocity(mean, std):
    """The exact velocity for data N(mean, std²) on the linear path: E[x1 − x0 | x_t = x]."""

    def velocity(x, t):
        t = t.reshape(-1, *([1] * (x.ndim - 1))).double()
        variance = t**2 * std**2 + (1 - t) ** 2
        centred = x - t * mean
        return (mean + (t * std**2 - (1 - t)) * centred / variance).to(x.dtype)

    return velocity


@pytest.mark.parametrize("sampler", [sde_euler, sde_heun])
def test_sde_samplers_reach_the_data_distribution(sampler):
    # The SDE shares the ODE's marginals only if drift, score and noise fit together (SiT eq. for the
    # reverse SDE): a wrong sign or scale in any of them moves the final mean or std.
    n = 20_000
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    draws = []
    x = sampler(
        gaussian_velocity(2.0, 0.5), z, time_grid(101, end=0.99).double(),
        noise_fn=lambda x: draws.append(1) or torch.randn(x.shape, generator=generator, dtype=x.dtype),
    )
    assert len(draws) == 100  # one draw per step; none for the last ("mean") step
    # Sample error 5·0.5/sqrt(n) = 0.018 for the mean and 5·0.5/sqrt(2n) = 0.0125 for the std, plus the
    # discretisation with 100 steps (O(h) for Euler–Maruyama's weak error, h = 0.01): 0.03 in all.
    assert x.mean().item() == pytest.approx(2.0, abs=0.03)
    assert x.std().item() == pytest.approx(0.5, abs=0.03)


def test_sampler_registry_and_options():
    flow, ddpm = build_objective("flow"), build_objective("ddpm")
    assert get_sampler("sde-heun", flow).needs == "velocity"
    with pytest.raises(UserError, match="unknown sampler 'rk4'; for this flow model use one of: sde-euler, sde-heun, euler"):
        get_sampler("rk4", flow)
    with pytest.raises(UserError, match="sampler 'euler' does not fit this ddpm model; use one of: ddpm, ddim, dpm"):
        get_sampler("euler", ddpm)
    with pytest.raises(TypeError):  # an option a sampler does not take is an error, not ignored
        ode_euler(decay, torch.ones(1), time_grid(3), noise_fn=torch.randn_like)


def test_velocity_model_keeps_the_first_channels():
    model = tiny_dit()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0.3, 0.8]), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.equal(VelocityModel(model)(x, t, y), model(x, t, y)[:, :4])
        # Real times are embedded as they are: 0.3 and 0.31 give different outputs.
        assert not torch.equal(model(x, t, y), model(x, t + 0.01, y))
