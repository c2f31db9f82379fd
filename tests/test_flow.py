"""Flow matching (fastdit.diffusion.flow) and its samplers (fastdit.sampling.flow): behaviour."""

import copy
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
    FlowSDE,
    ModelView,
    SamplingOptions,
    VelocityModel,
    get_sampler,
    guided_model,
    ode_dopri5,
    ode_euler,
    ode_heun,
    sample_latents,
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
    with pytest.raises(UserError, match="must run from 0 <= start < end <= 1, got \\[0.0, 1.5\\]"):
        time_grid(5, end=1.5)
    # A model SiT samples on a shorter interval starts later; the shift keeps the grid inside it.
    assert time_grid(3, start=0.001, end=0.999).tolist() == torch.linspace(0.001, 0.999, 3).tolist()
    assert 0 < time_grid(3, start=0.001, end=0.999, shift=3.0)[0] < 0.001


# ----------------------------------------------------------------------------------------------
# guidance and its interval
# ----------------------------------------------------------------------------------------------


FLOW_TIME = (0.0, 1.0)


def test_guidance_interval():
    model = VelocityModel(tiny_dit())
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = {"y": torch.tensor([1, 3])}
    times = time_grid(10)  # k/9: no time in (0.45, 0.5)

    def run(velocity_fn):
        return ode_euler(velocity_fn, z, times, cond=cond)

    plain_cfg = run(ClassifierFreeGuidance(model, 3.0, 5, 4))
    # The whole range is plain guidance (the same code path, so the same bits).
    assert torch.equal(run(ClassifierFreeGuidance(model, 3.0, 5, 4, interval=(0.0, 1.0), time_range=FLOW_TIME)), plain_cfg)
    assert torch.equal(run(ClassifierFreeGuidance(model, 3.0, 5, 4, interval=(0.45, 0.5), time_range=FLOW_TIME)), run(model))
    assert not torch.equal(plain_cfg, run(model))

    calls = []
    run(ClassifierFreeGuidance(counting(model, calls), 3.0, 5, 4, interval=(0.5, 1.0), time_range=FLOW_TIME))
    assert len(calls) == 9  # one forward per step, guided or not
    for batch, t in calls:
        assert batch == (4 if t[0] >= 0.5 else 2), (batch, t)  # doubled only inside the interval


def test_guidance_interval_per_row():
    # Rows at different times in one call: the rows inside are guided, the others conditional only.
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.7, 0.9])
    y = torch.tensor([0, 1, 2])
    guided = ClassifierFreeGuidance(elementwise_velocity, 2.0, 3, 2, interval=(0.6, 0.8), time_range=FLOW_TIME)(x, t, y)
    full = ClassifierFreeGuidance(elementwise_velocity, 2.0, 3, 2)(x, t, y)
    cond = elementwise_velocity(x, t, y)
    # Elementwise kernels may round the last bit differently for another batch shape: 2 ulp of |v| <= 3.
    tol = 2 * 3 * 2**-23
    assert torch.allclose(guided[1], full[1], rtol=0, atol=tol)
    assert torch.allclose(guided[[0, 2]], cond[[0, 2]], rtol=0, atol=tol)
    assert not torch.allclose(full[[0, 2]], cond[[0, 2]], rtol=0, atol=1e-3)


def test_guidance_arguments():
    with pytest.raises(UserError, match="guidance interval \\(0.8, 0.2\\)"):
        ClassifierFreeGuidance(elementwise_velocity, 2.0, 3, 2, interval=(0.8, 0.2), time_range=FLOW_TIME)
    with pytest.raises(UserError, match="cfg scale 0.5"):
        ClassifierFreeGuidance(elementwise_velocity, 0.5, 3, 2)


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


def issue_model():
    """The small SiT of issue #18's reproduction: weights drawn at a scale that makes guidance matter."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.dim() > 1 else 20))
    return model


class StartNoise:
    """`PerImageNoise`'s interface with a given start; an ODE sampler draws nothing more."""

    def __init__(self, z):
        self.z = z

    def draw(self, shape_per_image, dtype=torch.float32):
        return self.z.clone()

    def __call__(self, like):
        raise AssertionError("an ODE sampler draws no noise after the start")


def guided_ode_float64(model, z, y, scale, null_class):
    """dx/dt = u + s (c − u) on the first three velocity channels (SiT's forward_with_cfg) at every t,
    solved in float64 far below the sampler's tolerance: the guided ODE's end state."""
    network = copy.deepcopy(model).double()

    def velocity(x, t, y):
        out = network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out[:, : x.shape[1]].chunk(2)
        return torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)

    return ode_dopri5(velocity, z.double(), torch.tensor([0.0, 1.0], dtype=torch.float64), cond={"y": y},
                      atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("interval", [None, (0.0, 1.0)], ids=["every-step", "interval-0-1"])
def test_dopri5_guided_to_the_end_solves_the_guided_ode(interval):
    # Issue #18, item 1: dopri5 steps past t = 1 and interpolates back; an interval closed at 1 ran
    # those evaluations unguided, and the end state left the guided ODE (issue: 4e-3 of max|x| relative).
    pytest.importorskip("torchdiffeq")
    model = issue_model()
    z, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2])
    options = SamplingOptions(sampler="dopri5", num_steps=2, cfg_scale=4.0, guided_channels=3, guidance_interval=interval)
    final = sample_latents(model, y, objective=build_objective("flow"), options=options, noise=StartNoise(z))
    exact = guided_ode_float64(model, z, y, 4.0, model.config.null_class)
    # dopri5 holds each step's estimated local error to atol + rtol·|x| (rtol 1e-3) and propagates the
    # fifth-order solution, whose error is below the fourth-order estimate; over this short run (a few
    # steps of a smooth field) the end state is within rtol of the exact one: measured 9e-5 of max|x|,
    # and 5.2e-3 while the interval was closed at 1.
    err = ((final.double() - exact).abs().max() / exact.abs().max()).item()
    assert err <= 1e-3, err


def test_guidance_interval_reaching_an_end_guides_past_it():
    # A solver may ask for any t: a side of the interval at an end of the model's time range is open,
    # so t = 1.4 (past "1") and t = -0.2 (before "0") are guided like every other t of that side.
    model = issue_model()
    x, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 4])
    flow = build_objective("flow")

    def guided(interval):
        return guided_model(model, flow, SamplingOptions(sampler="euler", cfg_scale=4.0, guidance_interval=interval))

    with torch.no_grad():
        for t, interval in [(1.4, (0.5, 1.0)), (-0.2, (0.0, 0.5))]:
            times = torch.full((2,), t)
            every_t = guided(None)(x, times, y)
            assert torch.equal(guided(interval)(x, times, y), every_t)  # the same code path: the same bits
            assert not torch.allclose(every_t, model(x, times, y), atol=1e-3)  # guidance changes the output here
        # Inside the range the interval still bounds guidance: t = 0.3 is outside (0.5, 1], unguided.
        times = torch.full((2,), 0.3)
        assert torch.equal(guided((0.5, 1.0))(x, times, y), model(x, times, y))


def test_dopri5_tolerances_are_one_element_lists_as_sit_passes_them(monkeypatch):
    # SiT passes atol=[atol], rtol=[rtol]: torchdiffeq keeps them as 1-D float64 tensors, which win type
    # promotion over the float32 state, so the step control runs in float64 (floats would make 0-d
    # tensors, which do not, and the step choices would follow float32 roundings).
    torchdiffeq = pytest.importorskip("torchdiffeq")
    seen = {}
    original = torchdiffeq.odeint

    def spy(*args, **kwargs):
        seen.update(atol=kwargs["atol"], rtol=kwargs["rtol"])
        return original(*args, **kwargs)

    monkeypatch.setattr(torchdiffeq, "odeint", spy)
    ode_dopri5(decay, torch.ones(2), time_grid(2), atol=1e-6, rtol=1e-3)
    assert seen == {"atol": [1e-6], "rtol": [1e-3]}


def test_sde_without_diffusion_is_the_ode():
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    times = time_grid(6)
    ode = ode_euler(decay, z, times)
    never = lambda x: torch.full_like(x, float("nan"))  # noqa: E731  (the option checks come first)
    no_noise = FlowSDE.of_velocity(decay, diffusion_norm=0.0)
    sde = sde_euler(no_noise, z, times, noise_fn=lambda x: torch.randn_like(x), last_step=None)
    assert torch.equal(sde, ode)
    with pytest.raises(UserError, match="must end before 1"):
        sde_euler(no_noise, z, times, noise_fn=never)
    with pytest.raises(UserError, match="unknown SDE last step 'bogus'"):
        sde_heun(no_noise, z, time_grid(6, end=0.9), noise_fn=never, last_step="bogus")
    with pytest.raises(UserError, match="score is infinite at t = 1"):  # Heun's second call at the grid's end
        sde_heun(no_noise, z, times, noise_fn=never, last_step="none")
    with pytest.raises(UserError, match="unknown diffusion form 'sbmd'"):
        FlowSDE.of_velocity(decay, diffusion_form="sbmd")
    with pytest.raises(UserError, match="diffusion norm must be a finite number >= 0, got -1"):
        FlowSDE.of_velocity(decay, diffusion_norm=-1.0)


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
        FlowSDE.of_velocity(gaussian_velocity(2.0, 0.5)), z, time_grid(101, end=0.99).double(),
        noise_fn=lambda x: draws.append(1) or torch.randn(x.shape, generator=generator, dtype=x.dtype),
    )
    assert len(draws) == 100  # one draw per step; none for the last ("mean") step
    # Sample error 5·0.5/sqrt(n) = 0.018 for the mean and 5·0.5/sqrt(2n) = 0.0125 for the std, plus the
    # discretisation with 100 steps (O(h) for Euler–Maruyama's weak error, h = 0.01): 0.03 in all.
    assert x.mean().item() == pytest.approx(2.0, abs=0.03)
    assert x.std().item() == pytest.approx(0.5, abs=0.03)


def exact_prediction(objective, mean, std):
    """The exact network for data N(mean, std²) on the objective's path, in its prediction: with
    x_t = α x1 + σ x0 and V = α² std² + σ², E[x1 | x] = mean + α std² (x − α mean) / V and
    E[x0 | x] = σ (x − α mean) / V; the velocity is α̇ E[x1 | x] + σ̇ E[x0 | x], the noise E[x0 | x], the
    score −(x − α mean) / V."""
    path, prediction = objective.interpolant, objective.prediction

    def model(x, t, y):
        t = t.reshape(-1, *([1] * (x.ndim - 1))).double()
        (alpha, d_alpha), (sigma, d_sigma) = path.alpha(t), path.sigma(t)
        variance = alpha**2 * std**2 + sigma**2
        centred = x - alpha * mean
        if prediction == "velocity":
            return d_alpha * (mean + alpha * std**2 * centred / variance) + d_sigma * sigma * centred / variance
        return sigma * centred / variance if prediction == "noise" else -centred / variance

    return model


PATH_CASES = [(path, prediction, sampler, {}) for path in ("linear", "gvp", "vp")
              for prediction in ("velocity", "noise", "score") for sampler in ("euler", "heun")]
# SiT's SDE on the paths where its diffusion vanishes at the data end (σ_1 = 0), so that the noise-free
# last step from 0.96 leaves a sample of the data: VP's σ is still 0.14 at t = 0.96, and a constant
# diffusion never vanishes; there the last step (the mean of a step, or Tweedie's posterior mean) shrinks
# the spread by design, in SiT as here.
PATH_CASES += [(path, prediction, "sde-euler", {}) for path in ("linear", "gvp") for prediction in ("velocity", "noise", "score")]
PATH_CASES += [("linear", "velocity", "sde-heun", {}), ("gvp", "noise", "sde-euler", {"diffusion_form": "sbdm"}),
               ("linear", "score", "sde-euler", {"diffusion_form": "linear", "diffusion_norm": 2.0}),
               ("gvp", "velocity", "sde-euler", {"diffusion_form": "decreasing", "last_step": "tweedie"}),
               ("linear", "noise", "sde-euler", {"diffusion_form": "increasing-decreasing", "last_step": "euler"})]


@pytest.mark.parametrize("path,prediction,sampler,settings", PATH_CASES)
def test_every_path_and_prediction_samples_the_data_distribution(path, prediction, sampler, settings):
    # The exact network of each prediction, through the objective's views (its conversions and SiT's
    # interval) and the registered samplers: the final mean and std are those of the data only if every
    # coefficient, sign and end of the interval is right. A wrong one moves them by far more than the
    # tolerance (a sign: the mean to -2; a coefficient off by 1%: the std by ~0.005 per unit of drift).
    objective = build_objective("flow", path_type=path, prediction=prediction)
    options = SamplingOptions(sampler=sampler, num_steps=201, cfg_scale=1.0, **settings)
    options.validate(objective)
    chosen = get_sampler(sampler, objective)
    n, generator = 20_000, torch.Generator().manual_seed(0)
    z = torch.randn(n, 1, 1, 1, generator=generator, dtype=torch.float64)
    view = ModelView(objective, exact_prediction(objective, 2.0, 0.5), torch.zeros(n, dtype=torch.long), learn_sigma=False)
    x = chosen.run(view, z, num_steps=options.num_steps, progress=False,
                   noise_fn=lambda like: torch.randn(like.shape, generator=generator, dtype=like.dtype),
                   **{k: v for k, v in options.sampler_options().items() if k in chosen.options})
    # Sample error 5·0.5/sqrt(n) = 0.018 for the mean and 5·0.5/sqrt(2n) = 0.0125 for the std (the same
    # z for every case, so the ODEs share theirs: measured -0.012), plus the discretisation with 200 steps
    # (O(h), h = 0.005; measured <= 0.005) and VP's ODE ending at 1 − 1e-3 (σ = 0.01): 0.03 in all.
    assert x.mean().item() == pytest.approx(2.0, abs=0.03)
    assert x.std().item() == pytest.approx(0.5, abs=0.03)


def test_sampler_registry_and_options():
    flow, ddpm = build_objective("flow"), build_objective("ddpm")
    assert get_sampler("sde-heun", flow).needs == "sde" and get_sampler("heun", flow).needs == "velocity"
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


@pytest.mark.parametrize("objective,sampler,settings", [
    ("ddpm", "ddpm", {}), ("ddpm", "ddim", {}), ("ddpm", "dpm++2m", {}), ("flow", "euler", {}), ("flow", "heun", {}),
    ("flow", "sde-euler", {}), ("flow", "sde-heun", {}), ("flow", "sde-euler", {"last_step": "none"}),
    ("flow", "ddim", {"eta": 0.5}), ("flow", "dpm++2m", {}), ("flow", "dopri5", {})])
def test_every_sampler_says_how_many_model_calls_it_makes(objective, sampler, settings):
    """What the app's progress note counts up to: the estimates a run reports, one per model call."""
    from fastdit.latents import PixelSpace
    from fastdit.sampling import generate

    if sampler == "dopri5":
        pytest.importorskip("torchdiffeq")
    trained_for = build_objective(objective)
    options = SamplingOptions(sampler=sampler, num_steps=5, cfg_scale=1.0, **settings)
    options.validate(trained_for)
    calls = []
    generate(tiny_dit(learn_sigma=objective == "ddpm"), PixelSpace(4), [1], options=options, objective=trained_for,
             seed=0, on_estimate=lambda estimate: calls.append(1))
    expected = get_sampler(sampler, trained_for).model_calls(5, options.sampler_options())
    assert expected == (None if sampler == "dopri5" else len(calls))
