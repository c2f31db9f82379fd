"""Parity of the Gaussian diffusion with the official DiT/IDDPM code (fixtures made by its code)."""

import numpy as np
import pytest
import torch

from conftest import load_fixture, recipe_state_dict
from fastdit.diffusion import create_diffusion
from fastdit.models import build_model

GOLDEN = load_fixture("diffusion_golden.pt")
SCHEDULE_KEYS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
]
SPACINGS = {"1000": "", "250": "250", "50": "50"}


def close(actual, expected, rel=1e-6, scale=None):
    scale = max(expected.abs().max().item() if scale is None else scale, 1e-12)
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel:.0e} * {scale:.3e}"


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
    x_start, noise, t = GOLDEN["x_start"], GOLDEN["noise"], case["t"]
    kwargs = {"y": case["y"]}
    assert torch.equal(diffusion.original_timesteps(t), case["mapped_t"])
    with torch.no_grad():
        x_t = diffusion.q_sample(x_start, t, noise=noise)
        close(x_t, case["q_sample"])
        losses = diffusion.training_losses(model, x_start, t, kwargs, noise=noise)
        for key in ("loss", "mse", "vb"):
            close(losses[key], case["training_losses"][key], rel=1e-5)
        for clip in (0, 1):
            out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=bool(clip), model_kwargs=kwargs)
            for key in ("mean", "variance", "log_variance", "pred_xstart"):
                # Clamping to [-1, 1] keeps the absolute rounding error of the unclamped x0 (large at
                # high t, where 1/sqrt(ᾱ) amplifies the model's float32 rounding), so it is measured
                # against the unclamped magnitude.
                unclamped = case["p_mean_variance_clip0"][key].abs().max().item()
                close(out[key], case[f"p_mean_variance_clip{clip}"][key], scale=unclamped)
        torch.manual_seed(4)
        ddim = diffusion.ddim_sample(model, x_t, t, model_kwargs=kwargs, eta=0.0)
        for key in ("sample", "pred_xstart"):
            close(ddim[key], case["ddim_sample_eta0"][key])
        torch.manual_seed(4)
        step = diffusion.p_sample(model, x_t, t, model_kwargs=kwargs)
        for key in ("sample", "pred_xstart"):
            close(step[key], case["p_sample"][key])
        step = diffusion.p_sample(model, x_t, t, model_kwargs=kwargs, noise=case["p_sample_noise"])
        close(step["sample"], case["p_sample"]["sample"])
