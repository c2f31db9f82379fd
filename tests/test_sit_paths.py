"""Parity of SiT's other paths (GVP, VP), predictions (noise, score), loss weights and SDE settings
(diffusion form, norm, last step and its size) with the official SiT code (fixture
tests/fixtures/official-sit/sit_paths.pt, made by `make_paths.py` beside it from SiT's own code; see
its README). The network and weights are those of sit_golden.pt; tests/test_sit_parity.py holds the
linear path's velocity model, the released SiT-XL/2's kind, in more detail.

Each sampler step is checked from the OFFICIAL state x_k against the official x_{k+1}, with a bound
from error propagation; whole runs then go through the public path `fastdit sample` takes
(`sample_latents` with the registered samplers and the options as flags set them).

How the bounds are derived. At fixed (x, t) every map between the network's output and a sampler's
update is affine, elementwise with scalar coefficients: the velocity v = H_v x + G_v out, the SDE drift
v + w s = H_d x + G_d out, the Tweedie step, ... (`fastdit.diffusion.flow`). So a model error Δout moves
them by |G|·Δout, and their Jacobian in x is G·J + H·I, J the guided network's; G and H are read off the
map itself (`affine_parts`: f(0, 1) − f(0, 0) and f(1, 0) − f(0, 0), in float64). Then:

- Δout <= GUIDANCE_GAIN · MODEL_REL · max|raw output| at the state (guidance u + s(c − u) multiplies a
  per-output error by up to s + (s − 1)); MODEL_REL = 1e-5, the float32 GEMM-order bound of the model
  parity tests (tests/test_sit_parity.py).
- Euler (ODE) and Euler–Maruyama: dt·|G|·Δout. Heun: the second call's input carries dt·Δk1, which
  reaches k2 through |G|·LIPSCHITZ + |H|; the step's error is dt/2 (Δk1 + Δk2). LIPSCHITZ bounds
  ‖J‖∞ (max row sum of |∂out/∂x| of the guided output) at the states where the Heun steps of this
  fixture make their second call: measured once in float64 with autograd (max 12.5, the decreasing-
  increasing diffusion's run; minutes on a CPU, so not in the suite), with headroom.
- Rounding: ROUNDING_REL = 1e-6 (≈ 16 float32 roundings, each <= u = 2^-24 of its result) of the
  magnitudes the update adds up: |x|, |x'|, dt·(|H||x| + |G||out|), the noise term. The coefficients
  (sin, cos, exp of float32 t) are computed by the same formulas in the same order as SiT's; SiT's
  constant dt against our per-step dt, and its last step size against 1 − t_last (0.04000002), differ
  by a rounding of t, inside the same budget.
- Whole runs: the local checks bound every step; a worst-case bound through later steps grows with
  ∏(1 + dt·‖J_v‖∞) and says nothing useful, so the runs (which check the loop: grid, interval, noise
  order, last step) use the fixture README's 1e-4 of the trajectory's largest value.
"""

from pathlib import Path

import pytest
import torch

from fastdit.models import DiT
from fastdit.objectives import build_objective
from fastdit.sampling import ModelView, SamplingOptions, guided_model, ode_euler, ode_heun, sample_latents, sde_euler, sde_heun
from fastdit.sampling import time_grid

FIXTURES = Path(__file__).parent / "fixtures" / "official-sit"
GOLDEN = torch.load(FIXTURES / "sit_golden.pt", weights_only=True)
PATHS = torch.load(FIXTURES / "sit_paths.pt", weights_only=True)
SAMPLING = PATHS["sampling"]
SCALE = SAMPLING["cfg_scale"]
Y, NULL = SAMPLING["y"], SAMPLING["null_class"]

MODEL_REL = 1e-5
ROUNDING_REL = 1e-6
LIPSCHITZ = 16.0
TRAJECTORY_REL = 1e-4
GUIDANCE_GAIN = 2 * SCALE - 1
OFFICIAL_GUIDANCE = 3  # SiT's sample.py guides with DiT's forward_with_cfg rule: the first 3 channels

# SiT's spellings -> fastdit's flag values.
PATH_TYPE = {"Linear": "linear", "GVP": "gvp", "VP": "vp"}
FORM = {"sigma": "sigma", "SBDM": "sbdm", "linear": "linear", "decreasing": "decreasing",
        "inccreasing-decreasing": "increasing-decreasing"}
LAST_STEP = {"Mean": "mean", "Tweedie": "tweedie", "Euler": "euler", "None": "none"}
SDE_DEFAULTS = {"diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "mean", "last_step_size": 0.04}


@pytest.fixture(scope="module")
def model():
    network = DiT(**GOLDEN["model_kwargs"]).eval()
    network.load_state_dict(GOLDEN["state_dict"], strict=True)
    return network


def objective_of(key: str, loss_weight: str = "none"):
    path, prediction = key.split("_")[:2]
    return build_objective("flow", path_type=PATH_TYPE[path], prediction=prediction, loss_weight=loss_weight)


def sde_settings(case) -> dict:
    if "settings" not in case:
        return dict(SDE_DEFAULTS)
    recorded = case["settings"]
    return {"diffusion_form": FORM[recorded["diffusion_form"]], "diffusion_norm": float(recorded["diffusion_norm"]),
            "last_step": LAST_STEP[recorded["last_step"]], "last_step_size": float(recorded["last_step_size"])}


def options(sampler: str, num_steps: int, **sde) -> SamplingOptions:
    """What `fastdit sample --sampler S --num-sampling-steps N --cfg-scale 4 --official-guidance [SDE flags]` asks for."""
    return SamplingOptions(sampler=sampler, num_steps=num_steps, cfg_scale=SCALE, guided_channels=OFFICIAL_GUIDANCE, **sde)


def view_of(model, objective, sampler="euler"):
    """The guided model as the registered samplers see it (`generate`'s guided model, the objective's views)."""
    return ModelView(objective, guided_model(model, objective, options(sampler, 4)), Y, learn_sigma=True)


def assert_within(actual, expected, bound, what=""):
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"{what}: max |diff| {err:.3e} > bound {bound:.3e}"


def raw_scale(model, x, t):
    """The largest raw output (conditional and unconditional, first C channels) at state x, time t."""
    with torch.no_grad():
        out = model(torch.cat([x, x]), t.reshape(1).expand(2 * len(x)), torch.cat([Y, torch.full_like(Y, NULL)]))
    return out[:, : x.shape[1]].abs().max().item()


def affine_parts(objective, t, kind, **sde):
    """(G, H) of f(x, out) = H x + G out, the map `kind` of the objective at time t (module docstring):
    "velocity" (ODE), "drift" (SDE), or a last step ("mean", "euler", "tweedie", with dt = 1 − t)."""

    def f(x_value, out_value):
        x = torch.full((1, 4, 8, 8), float(x_value), dtype=torch.float64)
        view = ModelView(objective, lambda x_, t_, y_: torch.full_like(x_, float(out_value)), Y[:1], learn_sigma=False)
        times = t.reshape(1).double()
        if kind == "velocity":
            return view.velocity(x, times, Y[:1])
        sde_ = view.sde(sde["diffusion_form"], sde["diffusion_norm"])
        if kind == "drift":
            return sde_.drift(x, times, y=Y[:1])
        return sde_.last_step(kind, x, times, 1 - times.reshape(()), y=Y[:1])

    base = f(0, 0)
    return (f(0, 1) - base).abs().max().item(), (f(1, 0) - base).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Training: the path, the draws' interval, the loss and its weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(PATHS["training"]))
def test_training_loss(model, key):
    case = PATHS["training"][key]
    weight = key.split("_")[2]
    objective = objective_of(key, "none" if weight == "None" else weight)
    process = objective.path
    # SiT draws t ~ U[t0, t1) on its interval; ours is the same interval (float32, as SiT's draws are).
    assert torch.equal(torch.tensor(process.train_interval, dtype=torch.float32), case["interval"])
    x1, x0, t, y = case["x1"], case["x0_noise"], case["t"], case["y"]
    # x_t = α x1 + σ x0 with α, σ by SiT's formulas: three roundings of |α x1| + |σ x0| <= |x1| + |x0|.
    x_t = objective.interpolant.interpolate(x1, x0, t)
    assert_within(x_t, case["x_t"], 6 * 2**-24 * (x1.abs().max() + x0.abs().max()).item(), f"{key} x_t")
    with torch.no_grad():
        loss = process.loss(model, x1, {"y": y}, t=t, noise=x0)
    # ∂loss/∂pred = 2 w r c / n, r the residual, c = σ_t for the score's (ŝ σ + x0) and 1 otherwise: the
    # model error δ moves each loss by <= mean(2 w |r| c)·δ; the weights and the mean round within
    # ROUNDING_REL of the loss (a mean of 256 terms rounds within log2(256)·u).
    delta = MODEL_REL * case["pred"].abs().max().item()
    pred, tt = case["pred"], t.reshape(-1, 1, 1, 1)
    sigma = objective.interpolant.sigma(tt)[0]
    prediction = objective.prediction
    if prediction == "velocity":
        residual, c = pred - objective.interpolant.target_velocity(x1, x0, t), 1.0
    elif prediction == "noise":
        residual, c = pred - x0, 1.0
    else:
        residual, c = pred * sigma + x0, sigma
    w = process.weight(t, x1)
    bound = (2 * w * residual.abs() * c).flatten(1).mean(1) * delta + ROUNDING_REL * case["loss"]
    assert ((loss - case["loss"]).abs() <= bound).all(), (loss - case["loss"]).abs() / bound


def test_every_path_and_prediction_has_a_case():
    names = {key.rsplit("_", 1)[0] for key in PATHS["training"]}
    assert names == {f"{p}_{q}" for p in PATH_TYPE for q in ("velocity", "noise", "score")}
    assert {key.rsplit("_", 1)[1] for key in PATHS["training"]} == {"None", "velocity", "likelihood"}


# ----------------------------------------------------------------------------------------------
# The probability-flow ODE: every step from the official state, then whole runs
# ----------------------------------------------------------------------------------------------


def ode_key_method(key):
    return key.rsplit("_", 2)[0], key.rsplit("_", 2)[1]


@pytest.mark.parametrize("key", sorted(PATHS["ode"]))
def test_ode_steps(model, key):
    case = PATHS["ode"][key]
    name, method = ode_key_method(key)
    objective = objective_of(name)
    start, end = objective.sample_interval()
    assert torch.equal(torch.tensor([start, end], dtype=torch.float32), case["interval"])  # SiT's interval
    states, times = case["trajectory"], time_grid(len(case["trajectory"]), start=start, end=end)
    velocity = view_of(model, objective).velocity
    for k in range(len(states) - 1):
        t, t_next = times[k], times[k + 1]
        dt = (t_next - t).item()
        g, h = affine_parts(objective, t, "velocity")
        out = GUIDANCE_GAIN * raw_scale(model, states[k], t)
        delta = GUIDANCE_GAIN * MODEL_REL * raw_scale(model, states[k], t)
        terms = states[k].abs().max().item() + states[k + 1].abs().max().item() + dt * (h * states[k].abs().max().item() + g * out)
        if method == "euler":
            step = ode_euler(velocity, states[k], times[k : k + 2], cond={"y": Y})
            bound = dt * g * delta
        else:
            g2, h2 = affine_parts(objective, t_next, "velocity")
            delta2 = GUIDANCE_GAIN * MODEL_REL * raw_scale(model, states[k + 1], t_next)
            terms += dt * (h2 * states[k + 1].abs().max().item() + g2 * GUIDANCE_GAIN * raw_scale(model, states[k + 1], t_next))
            step = ode_heun(velocity, states[k], times[k : k + 2], cond={"y": Y})
            k1_error = g * delta
            k2_error = g2 * delta2 + (g2 * LIPSCHITZ + h2) * dt * k1_error
            bound = 0.5 * dt * (k1_error + k2_error)
        assert_within(step, states[k + 1], bound + ROUNDING_REL * terms, f"{key} step {k}")


class ScriptedNoise:
    """`PerImageNoise`'s interface: the fixture's start z, then its recorded draws (first half of SiT's
    doubled batch), in order."""

    def __init__(self, tape=()):
        self.tape = iter(tape)

    def draw(self, shape_per_image, dtype=torch.float32):
        return SAMPLING["z"].clone()

    def __call__(self, like):
        return next(self.tape)[: len(like)]


def run_publicly(model, objective, sampler, num_steps, tape=(), **sde):
    noise = ScriptedNoise(tape)
    final = sample_latents(model, Y, objective=objective, options=options(sampler, num_steps, **sde), noise=noise)
    assert next(noise.tape, None) is None  # every recorded draw taken, and no more
    return final


@pytest.mark.parametrize("key", sorted(PATHS["ode"]))
def test_ode_runs(model, key):
    case = PATHS["ode"][key]
    name, method = ode_key_method(key)
    final = run_publicly(model, objective_of(name), "euler" if method == "euler" else "heun", len(case["trajectory"]))
    assert_within(final, case["trajectory"][-1], TRAJECTORY_REL * case["trajectory"].abs().max().item(), key)


# ----------------------------------------------------------------------------------------------
# SiT's SDE: every step from the official state, the last step, then whole runs
# ----------------------------------------------------------------------------------------------

SDE_CASES = [("sde", key) for key in sorted(PATHS["sde"])] + [("sde_settings", key) for key in sorted(PATHS["sde_settings"])]


def sde_method(key):
    return "Heun" if "_Heun" in key else "Euler"


@pytest.mark.parametrize("group,key", SDE_CASES)
def test_sde_steps(model, group, key):
    case = PATHS[group][key]
    objective, settings = objective_of(key), sde_settings(case)
    method = sde_method(key)
    size = 0.0 if settings["last_step"] == "none" else settings["last_step_size"]
    start, end = objective.sample_interval(sde=True, diffusion_form=settings["diffusion_form"], last_step_size=size)
    assert torch.equal(torch.tensor([start, end], dtype=torch.float32), case["interval"])  # SiT's interval
    states = torch.cat([SAMPLING["z"][None], case["steps"]])
    times = time_grid(len(states) - 1, start=start, end=end)  # N points: N − 1 steps, then the last step
    sde = view_of(model, objective, "sde-euler").sde(settings["diffusion_form"], settings["diffusion_norm"])
    sampler = sde_euler if method == "Euler" else sde_heun
    for k in range(len(states) - 1):
        x, target = states[k], states[k + 1]
        if k == len(states) - 2:  # the last step: no noise, from the grid's end to 1
            if settings["last_step"] == "none":
                assert torch.equal(x, target)  # SiT repeats the state
                continue
            t = times[-1]
            step = sampler(sde, x, times[-1:], noise_fn=None, cond={"y": Y}, last_step=settings["last_step"])
            g, h = affine_parts(objective, t, settings["last_step"], **settings)
            out = GUIDANCE_GAIN * raw_scale(model, x, t)
            bound = g * GUIDANCE_GAIN * MODEL_REL * raw_scale(model, x, t)
            terms = x.abs().max().item() + target.abs().max().item() + h * x.abs().max().item() + g * out
            assert_within(step, target, bound + ROUNDING_REL * terms, f"{key} last step")
            continue
        noise = case["noise_tape_full_batch"][k][: len(x)]
        t, t_next = times[k], times[k + 1]
        dt = (t_next - t).item()
        step = sampler(sde, x, times[k : k + 2], noise_fn=lambda like: noise, cond={"y": Y}, last_step="none")
        g, h = affine_parts(objective, t, "drift", **settings)
        w = sde.diffusion(t.reshape(1), x).abs().max().item()
        noise_term = (2 * w * dt) ** 0.5 * noise.abs().max().item()
        delta = GUIDANCE_GAIN * MODEL_REL * raw_scale(model, x, t)
        scale = x.abs().max().item() + noise_term
        terms = scale + target.abs().max().item() + dt * (h * scale + g * GUIDANCE_GAIN * raw_scale(model, x, t))
        if method == "Euler":
            bound = dt * g * delta
        else:
            g2, h2 = affine_parts(objective, t_next, "drift", **settings)
            delta2 = GUIDANCE_GAIN * MODEL_REL * raw_scale(model, target, t_next)
            terms += dt * (h2 * target.abs().max().item() + g2 * GUIDANCE_GAIN * raw_scale(model, target, t_next))
            k1_error = g * delta
            k2_error = g2 * delta2 + (g2 * LIPSCHITZ + h2) * dt * k1_error
            bound = 0.5 * dt * (k1_error + k2_error)
        assert_within(step, target, bound + ROUNDING_REL * terms, f"{key} step {k}")


@pytest.mark.parametrize("group,key", SDE_CASES)
def test_sde_runs(model, group, key):
    case = PATHS[group][key]
    sampler = "sde-heun" if sde_method(key) == "Heun" else "sde-euler"
    final = run_publicly(model, objective_of(key), sampler, len(case["steps"]), tape=case["noise_tape_full_batch"],
                         **sde_settings(case))
    assert_within(final, case["steps"][-1], TRAJECTORY_REL * case["steps"].abs().max().item(), key)


def test_every_sde_setting_has_a_case():
    settings = [sde_settings(case) for case in PATHS["sde_settings"].values()]
    # SiT's "constant" form has no case: its integrators refuse the float it returns (make_paths.py).
    assert {s["diffusion_form"] for s in settings} == {"sbdm", "sigma", "linear", "decreasing", "increasing-decreasing"}
    assert {s["last_step"] for s in settings} == {"mean", "tweedie", "euler", "none"}
    assert {s["diffusion_norm"] for s in settings} >= {0.0, 0.5, 1.0, 2.5}
    assert {s["last_step_size"] for s in settings} == {0.04, 0.1}
