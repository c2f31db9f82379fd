"""Parity of flow matching with the official SiT code (willisma/SiT; fixtures made by its code, see
tests/fixtures/official-sit/README.md): network output, training loss, and every sampling trajectory.

Sampling goes through the public path `fastdit sample` takes: the guided model that `generate`
builds (`guided_model`, with --official-guidance's three channels), seen through the flow objective's
velocity view (`ModelView`), and for whole runs `sample_latents` with the registered sampler; only the
start noise and the SDE's draws are the fixture's, fed by a scripted noise source."""

from pathlib import Path

import pytest
import torch

from fastdit.diffusion import FlowMatching
from fastdit.models import DiT
from fastdit.objectives import build_objective
from fastdit.sampling import (
    SIT_LAST_STEP_SIZE,
    FlowSDE,
    ModelView,
    SamplingOptions,
    VelocityModel,
    guided_model,
    ode_euler,
    ode_heun,
    sample_latents,
    sde_euler,
    sde_heun,
    time_grid,
)

GOLDEN = torch.load(Path(__file__).parent / "fixtures" / "official-sit" / "sit_golden.pt", weights_only=True)
SAMPLING = GOLDEN["sampling"]
SCALE = SAMPLING["cfg_scale"]

# Tolerances, from float32 error propagation (u = 2^-24 ≈ 6e-8):
# - MODEL_REL: one network call agrees with the official one to 1e-5 of its output's magnitude, the
#   bound the DiT model parity tests hold on every CPU (float32 GEMMs may sum their ≤ 256-term dot
#   products in another order: ~sqrt(256)·u per layer, over a few layers).
# - ROUNDING_REL: the handful of float32 roundings of an update written in another order (x + dt·v,
#   its constant dt against our per-step dt, 1 − t_last against its last step size), each ≤ u of the
#   state's scale: 1e-6 of it.
# - A sampler step from the OFFICIAL state x_k to x_{k+1} adds the model error through the step's
#   coefficients (first order): guidance v = u + s(c − u) multiplies it by up to s + (s − 1) = 2s − 1;
#   the SDE drift v + norm·(t·v − x) by (1 + norm·t); the step by dt. A Heun step's second call is
#   made at x + dt·k1, so k1's error also reaches k2 through the velocity's Jacobian J, a further
#   dt·‖J‖∞·|Δk1|. ‖J‖∞ (max row sum of |∂v/∂x| for the guided velocity) is <= LIPSCHITZ at every
#   state of these trajectories: measured once in float64 with autograd (minutes on a CPU, so not
#   in the suite), with headroom.
# - Whole trajectories from z accumulate these local errors, and a worst-case bound through later
#   steps (∏(1 + dt·‖J‖∞) ≈ e^10) is useless; the local checks above bound every step instead, and the
#   end-to-end runs (which check the loop: grid, noise order, last step) use the fixture README's
#   1e-4 · max|ref|. dopri5 chooses its steps by an error estimate held to atol + rtol·|x| per step,
#   so two runs whose step choices differ by one rounding agree only to that order: 1e-3 (rtol).
MODEL_REL = 1e-5
ROUNDING_REL = 1e-6
LIPSCHITZ = 12.0
TRAJECTORY_REL = 1e-4
DOPRI5_REL = 1e-3
GUIDANCE_GAIN = 2 * SCALE - 1
NORM = 1.0  # the fixtures' diffusion_norm
FLOW = build_objective("flow")
OFFICIAL_GUIDANCE = 3  # --official-guidance: SiT's sample.py guides with DiT's forward_with_cfg rule


def assert_within(actual, expected, bound, what=""):
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"{what}: max |diff| {err:.3e} > bound {bound:.3e}"


@pytest.fixture(scope="module")
def model():
    network = DiT(**GOLDEN["model_kwargs"]).eval()
    network.load_state_dict(GOLDEN["state_dict"], strict=True)  # SiT's parameter names are DiT's
    return network


def public_options(sampler: str, num_steps: int, cfg_scale: float = SCALE) -> SamplingOptions:
    """What `fastdit sample --sampler S --num-sampling-steps N --cfg-scale 4 --official-guidance` asks for."""
    return SamplingOptions(sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale, guided_channels=OFFICIAL_GUIDANCE)


def public_velocity(model, cfg_scale: float = SCALE):
    """The velocity the registered flow samplers integrate: `generate`'s guided model through the flow view."""
    model_fn = guided_model(model, FLOW, public_options("euler", 10, cfg_scale))
    return ModelView(FLOW, model_fn, SAMPLING["y"], learn_sigma=model.config.learn_sigma).velocity


@pytest.fixture(scope="module")
def guided(model):
    return public_velocity(model)


class ScriptedNoise:
    """A noise source with `PerImageNoise`'s interface whose start is the fixture's z and whose step
    draws are the fixture's tape (the first half of SiT's doubled batch), in order."""

    def __init__(self, tape=()):
        self.tape = iter(tape)

    def draw(self, shape_per_image, dtype=torch.float32):
        assert tuple(shape_per_image) == tuple(SAMPLING["z"].shape[1:])
        return SAMPLING["z"].clone()

    def __call__(self, like):
        return next(self.tape)[: len(like)]


def sample_publicly(model, sampler, num_steps, cfg_scale=SCALE, tape=(), interval=None):
    """`sample_latents`, the function `generate` runs, from the fixture's z (and noise tape)."""
    noise = ScriptedNoise(tape)
    options = public_options(sampler, num_steps, cfg_scale)
    options.guidance_interval = interval
    final = sample_latents(model, SAMPLING["y"], objective=FLOW, options=options, noise=noise)
    assert next(noise.tape, None) is None  # every draw of the tape was taken, and no more
    return final


def model_error(model, x, t):
    """MODEL_REL of the largest raw output (conditional or unconditional) at state x, time t."""
    y = SAMPLING["y"]
    with torch.no_grad():
        out = VelocityModel(model)(torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([y, torch.full_like(y, 10)]))
    return MODEL_REL * out.abs().max().item()


def test_network_output_is_the_velocity_half_and_embeds_real_t(model):
    case = GOLDEN["model"]  # t = 0, 0.25, 0.6, 1: real times, embedded as they are
    with torch.no_grad():
        out = VelocityModel(model)(case["x"], case["t"], case["y"])
    assert_within(out, case["out"], MODEL_REL * case["out"].abs().max().item(), "velocity")


def test_training_loss(model):
    case = GOLDEN["training_loss"]
    flow = FlowMatching()
    x1, x0, t = case["x1"], case["x0_noise"], case["t"]
    # x_t = t·x1 + (1 − t)·x0: three roundings on either side, each <= u of |t·x1| + |(1 − t)·x0|.
    x_t = flow.interpolate(x1, x0, t)
    assert_within(x_t, case["x_t"], 6 * 2**-24 * (x1.abs().max() + x0.abs().max()).item(), "x_t")
    assert torch.equal(flow.target_velocity(x1, x0), case["target_u_t"])  # one exact-rounded subtraction
    with torch.no_grad():
        loss = flow.loss(model, x1, {"y": case["y"]}, t=t, noise=x0)
    # ∂loss/∂pred = 2(pred − u)/n: the model error moves each loss by <= 2·mean|pred − u|·δ; the mean of
    # 256 squares rounds within log2(256)·u of it (pairwise sums), under ROUNDING_REL.
    delta = MODEL_REL * case["pred"].abs().max().item()
    bound = 2 * (case["pred"] - case["target_u_t"]).abs().flatten(1).mean(1) * delta + ROUNDING_REL * case["loss"]
    assert ((loss - case["loss"]).abs() <= bound).all(), (loss - case["loss"]).abs() / bound


# ----------------------------------------------------------------------------------------------
# Sampling: every step from the official state, then whole runs from z
# ----------------------------------------------------------------------------------------------


def one_step(sampler, velocity_fn, x, times, **options):
    return sampler(velocity_fn, x, times, cond={"y": SAMPLING["y"]}, **options)


@pytest.mark.parametrize("key,guidance", [("ode_euler_10", True), ("ode_euler_10_nocfg", False)])
def test_ode_euler_steps(model, guided, key, guidance):
    states = SAMPLING[key]["trajectory"]
    times = time_grid(len(states))
    velocity = guided if guidance else public_velocity(model, cfg_scale=1.0)
    gain = GUIDANCE_GAIN if guidance else 1.0
    for k in range(len(states) - 1):
        step = one_step(ode_euler, velocity, states[k], times[k : k + 2])
        dt = (times[k + 1] - times[k]).item()
        bound = dt * gain * model_error(model, states[k], times[k]) + ROUNDING_REL * states[k + 1].abs().max().item()
        assert_within(step, states[k + 1], bound, f"{key} step {k}")


def test_ode_heun_steps(model, guided):
    states = SAMPLING["ode_heun2_6"]["trajectory"]
    times = time_grid(len(states))
    for k in range(len(states) - 1):
        dt = (times[k + 1] - times[k]).item()
        delta = GUIDANCE_GAIN * max(model_error(model, states[k], times[k]), model_error(model, states[k + 1], times[k + 1]))
        # Δ = dt/2 (Δk1 + Δk2), |Δk2| <= δ + dt·‖J‖·|Δk1|; k2's input is close to x_{k+1}, whose
        # outputs' scale stands in for it.
        bound = 0.5 * dt * (2 * delta + dt * LIPSCHITZ * delta) + ROUNDING_REL * states[k + 1].abs().max().item()
        step = one_step(ode_heun, guided, states[k], times[k : k + 2])
        assert_within(step, states[k + 1], bound, f"heun step {k}")


@pytest.mark.parametrize("method", ["Euler", "Heun"])
def test_sde_steps(model, guided, method):
    case = SAMPLING[f"sde_{method}_8"]
    states = torch.cat([SAMPLING["z"][None], case["steps"]])
    times = time_grid(len(states) - 1, end=1 - SIT_LAST_STEP_SIZE)  # 7 steps, then the last step
    sampler = sde_euler if method == "Euler" else sde_heun
    sde = FlowSDE.of_velocity(guided, diffusion_norm=NORM)  # SiT's score from the velocity, the "sigma" form
    for k in range(len(states) - 1):
        last = k == len(states) - 2
        if last:  # the "Mean" step: drift only, from t = 0.96 to 1 — no noise is drawn
            step = one_step(sampler, sde, states[k], times[-1:], noise_fn=None, last_step="mean")
            t, dt, t_next = times[-1].item(), 1 - times[-1].item(), 1.0
        else:
            # The official noise is drawn for the doubled batch; the first half moves our two images.
            noise = case["noise_tape_full_batch"][k][:2]
            step = one_step(sampler, sde, states[k], times[k : k + 2], noise_fn=lambda x: noise, last_step=None)
            t, t_next = times[k].item(), times[k + 1].item()
            dt = t_next - t
        # The model runs near x_k and x_{k+1} (at x̂, x̂ + dt·k1); their outputs' scale stands in for it.
        scale_states = [(states[k], times[min(k, len(times) - 1)])] + ([] if last else [(states[k + 1], times[k + 1])])
        delta = GUIDANCE_GAIN * max(model_error(model, x, time) for x, time in scale_states)
        drift_error = (1 + NORM * t) * delta
        if method == "Heun" and not last:
            # k2 = drift(x̂ + dt·k1, t'): its input error dt·Δk1 passes through (1 + norm·t')·J − norm·I.
            k2_error = (1 + NORM * t_next) * delta + ((1 + NORM * t_next) * LIPSCHITZ + NORM) * dt * drift_error
            bound = 0.5 * dt * (drift_error + k2_error)
        else:
            bound = dt * drift_error
        bound += ROUNDING_REL * states[k + 1].abs().max().item()
        assert_within(step, states[k + 1], bound, f"SDE {method} step {k}")


@pytest.mark.parametrize(
    "key,sampler,guidance", [("ode_euler_10", "euler", True), ("ode_euler_10_nocfg", "euler", False), ("ode_heun2_6", "heun", True)]
)
def test_ode_runs(model, key, sampler, guidance):
    expected = SAMPLING[key]
    final = sample_publicly(model, sampler, len(expected["trajectory"]), cfg_scale=SCALE if guidance else 1.0)
    assert_within(final, expected["final"], TRAJECTORY_REL * expected["trajectory"].abs().max().item(), key)


@pytest.mark.parametrize("method,sampler", [("Euler", "sde-euler"), ("Heun", "sde-heun")])
def test_sde_runs(model, method, sampler):
    # The registered SDE samplers: 8 grid points up to 1 − 0.04, diffusion norm 1 (the fixtures'), then
    # the "Mean" last step, which draws no noise.
    expected = SAMPLING[f"sde_{method}_8"]
    final = sample_publicly(model, sampler, 8, tape=expected["noise_tape_full_batch"])
    assert_within(final, expected["final"], TRAJECTORY_REL * expected["steps"].abs().max().item(), method)


@pytest.mark.parametrize("interval", [None, (0.0, 1.0)], ids=["every-step", "interval-0-1"])
def test_dopri5_run(model, interval):
    pytest.importorskip("torchdiffeq")
    expected = SAMPLING["ode_dopri5_2"]
    # SiT integrates the doubled batch [z, z] (its second half differs from the first in the unguided
    # fourth channel); the public path integrates z alone, so dopri5's error norm, and with it its step
    # choices, differ: the runs agree to the solver's tolerance, rtol of the state (DOPRI5_REL; measured
    # 7e-6). `--guidance-interval 0 1` is the same ODE: while the interval was closed at 1, the
    # evaluations dopri5 makes past t = 1 ran unguided and this run was off by 1.6e-3.
    final = sample_publicly(model, "dopri5", 2, interval=interval)
    assert_within(final, expected["final"], DOPRI5_REL * expected["final"].abs().max().item(), "dopri5")
