"""Parity of the Gaussian diffusion with the official DiT/IDDPM code (fixtures made by its code)."""

import numpy as np
import pytest
import torch

from conftest import load_fixture, recipe_state_dict
from fastdit.diffusion import create_diffusion
from fastdit.models import build_model
from official_steps import ddim_step

GOLDEN = load_fixture("diffusion_golden.pt")
SCHEDULE_KEYS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
]
SPACINGS = {"1000": "", "250": "250", "50": "50"}


# Tolerances. Every comparison allows (a) the official code's and our own float32 roundings of the
# same operations: ROUNDING_REL of the output's scale (a handful of roundings of u = 2^-24 each; the
# schedule coefficients are gathered in float64 and cast to float32 exactly as the official code does),
# plus (b) the error that the model output's own error causes, propagated to first order:
# |Δout_i| <= Σ_j |∂out_i/∂m_j| · δ_j, the derivatives taken by autograd in float64 (`propagated`).
# δ is the model's error bound: for the DiT, the model fixtures' tolerance 1e-5 · max|m| (float32
# GEMMs sum in different orders on different CPUs); for the elementwise dummy model, 2 ulp on each
# side of tanh/sin kernels that differ between vector widths (its outputs are <= 1 in magnitude).
# This is where 1/sqrt(ᾱ) enters: x̂0 = sqrt(1/ᾱ)·x_t − sqrt(1/ᾱ − 1)·ε̂ multiplies the ε error by
# up to 158 at t = 999, and the derivatives carry that into the mean, DDIM and the VLB.
U = 2.0**-24
ROUNDING_REL = 1e-6
DIT_MODEL_REL = 1e-5
DUMMY_MODEL_ABS = 4 * U


def close(actual, expected, bound=0.0, scale=None):
    scale = max(expected.abs().max().item() if scale is None else scale, 1e-12)
    excess = ((actual - expected).abs() - bound).max().item()
    err = (actual - expected).abs().max().item()
    assert excess <= ROUNDING_REL * scale, f"max |diff| {err:.3e} exceeds the propagated bound + {ROUNDING_REL:.0e} * {scale:.3e}"


def propagated(fn, model_output, delta, per_sample=False):
    """First-order bound on |Δ fn(m)| for |Δm| <= delta, where each element of m reaches one element of
    fn(m) (elementwise maps: ε and v of a position reach that position's output) or, with
    `per_sample`, one sample's value. Then the gradient of the sum holds exactly the partials needed."""
    m = model_output.detach().double().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(m).sum(), m)
    grad = grad.abs() * delta
    if per_sample:
        return grad.flatten(1).sum(1)
    C = grad.shape[1] // 2
    return grad[:, :C] + grad[:, C:]


def dummy_model(x, tau, y):
    shape = (-1,) + (1,) * (x.ndim - 1)
    a = (tau.float() / 1000).reshape(shape)
    b = (y.float() / 10).reshape(shape)
    return torch.cat([torch.tanh(0.7 * x + a - b), torch.sin(1.3 * x + 2 * a + b)], dim=1)


def official_s8():
    torch.manual_seed(0)
    model = build_model("DiT-S/8", input_size=8, num_classes=10, learn_sigma=True).eval()
    state = recipe_state_dict(model)
    state["pos_embed"] = GOLDEN["dit_pos_embed"]
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("name", ["1000", "250", "50"])
def test_schedules(name):
    expected = GOLDEN["schedules"][name]
    diffusion = create_diffusion(SPACINGS[name])
    assert diffusion.num_timesteps == expected["num_timesteps"]
    assert list(diffusion.timestep_map) == list(np.asarray(expected["timestep_map"]))
    for key in SCHEDULE_KEYS:
        ours = getattr(diffusion, key)
        theirs = np.asarray(expected[key], dtype=np.float64)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0, err_msg=key)


CASES = [("dummy", name) for name in ["1000", "1000_edge", "250", "50"]] + [("dit", n) for n in ["1000", "250", "50"]]


@pytest.mark.parametrize("family,name", CASES)
def test_process_steps(family, name):
    case = GOLDEN[family][name]
    model = dummy_model if family == "dummy" else official_s8()
    diffusion = create_diffusion(SPACINGS[name.split("_")[0]])
    x_start, noise, t, y = GOLDEN["x_start"], GOLDEN["noise"], case["t"], case["y"]
    kwargs = {"y": y}
    assert torch.equal(diffusion.original_timesteps(t), case["mapped_t"])
    with torch.no_grad():
        x_t = diffusion.q_sample(x_start, t, noise=noise)
        close(x_t, case["q_sample"])
        output = model(x_t, diffusion.original_timesteps(t), y)
    delta = DIT_MODEL_REL * output.abs().max().item() if family == "dit" else DUMMY_MODEL_ABS

    # The process run in float64 on a fixed model output m, to take derivatives with respect to m.
    x64, x_t64, step_noise = x_start.double(), x_t.double(), case["p_sample_noise"].double()
    fixed = lambda m: (lambda x, tau, y: m)  # noqa: E731  a "model" that returns m
    bound = {
        "mse": propagated(lambda m: diffusion.training_losses(fixed(m), x64, t, kwargs, noise=noise.double())["mse"], output, delta, per_sample=True),
        # The VLB itself: training_losses detaches ε inside it (for the gradient), but its value depends on ε.
        "vb": propagated(lambda m: diffusion._vb_terms_bpd(m, x64, x_t64, t), output, delta, per_sample=True),
        "ddim": propagated(lambda m: ddim_step(diffusion, fixed(m), x_t64, t, model_kwargs=kwargs)["sample"], output, delta),
        "p_sample": propagated(lambda m: diffusion.p_sample(fixed(m), x_t64, t, model_kwargs=kwargs, noise=step_noise)["sample"], output, delta),
    }
    bound["loss"] = bound["mse"] + bound["vb"]
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        # Clamping x̂0 (clip1) cannot increase an error, so the unclamped bound holds for both.
        bound[key] = propagated(lambda m: diffusion.p_mean_variance_from_output(m, x_t64, t)[key], output, delta)

    with torch.no_grad():
        losses = diffusion.training_losses(model, x_start, t, kwargs, noise=noise)
        for key in ("loss", "mse", "vb"):
            close(losses[key], case["training_losses"][key], bound[key])
        for clip in (0, 1):
            out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=bool(clip), model_kwargs=kwargs)
            for key in ("mean", "variance", "log_variance", "pred_xstart"):
                # Clamping to [-1, 1] keeps the absolute rounding error of the unclamped x0, so the
                # rounding allowance is measured against the unclamped magnitude.
                unclamped = case["p_mean_variance_clip0"][key].abs().max().item()
                close(out[key], case[f"p_mean_variance_clip{clip}"][key], bound[key], scale=unclamped)
        torch.manual_seed(4)
        ddim = ddim_step(diffusion, model, x_t, t, model_kwargs=kwargs, eta=0.0)
        close(ddim["sample"], case["ddim_sample_eta0"]["sample"], bound["ddim"])
        close(ddim["pred_xstart"], case["ddim_sample_eta0"]["pred_xstart"], bound["pred_xstart"])
        step = diffusion.p_sample(model, x_t, t, model_kwargs=kwargs, noise=case["p_sample_noise"])
        close(step["sample"], case["p_sample"]["sample"], bound["p_sample"])
        close(step["pred_xstart"], case["p_sample"]["pred_xstart"], bound["pred_xstart"])
        # Without a noise argument, p_sample draws randn_like(x) from the global generator, as the
        # official step does. torch's float32 normals depend on the CPU's kernels (the fixture's noise
        # is 1e-6 off under ATEN_CPU_CAPABILITY=default), so the draw is checked on this machine.
        torch.manual_seed(4)
        drawn = diffusion.p_sample(model, x_t, t, model_kwargs=kwargs)["sample"]
        torch.manual_seed(4)
        local_noise = torch.randn_like(x_t)
        assert torch.equal(drawn, diffusion.p_sample(model, x_t, t, model_kwargs=kwargs, noise=local_noise)["sample"])
