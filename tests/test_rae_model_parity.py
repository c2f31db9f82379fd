"""Parity of DiT^DH, RAE's time shift, its training loss and its sampler (with and without AutoGuidance)
with RAE's own code (bytetriper/RAE; fixtures made by running it on random weights, see
tests/fixtures/rae-model/README.md).

Sampling goes through the public path `fastdit sample` takes: `sample_latents` with the registered
sampler over the `rae` objective's views of the model `guided_model` builds (classifier-free guidance,
or AutoGuidance by the attached guidance model, with the guidance interval), from the fixture's start
noise fed by a scripted noise source. RAE's clock runs the other way (σ = 1 is noise); fastdit's flow
time is t = 1 − σ, so RAE's guidance interval [a, b] is fastdit's [1 − b, 1 − a]."""

import json
from pathlib import Path

import pytest
import torch

from fastdit.models import DiTConfig, build_from_config, build_model
from fastdit.objectives import TrainingNetwork, build_objective
from fastdit.sampling import ModelView, SamplingOptions, guided_model, sample_latents

HERE = Path(__file__).parent / "fixtures" / "rae-model"
FIXTURE = torch.load(HERE / "rae_model.pt", weights_only=True)
LAYOUTS = json.loads((HERE / "rae_layouts.json").read_text())
SAMPLING = FIXTURE["sampling"]
NULL = FIXTURE["null_class"]
SHAPE = (8, 4, 4)  # the tiny networks' input (C, H, W)
RAE = build_objective("rae", time_shift_base=FIXTURE["shift_base"])  # shift sqrt(128 / 16) = sqrt(8) here
SHIFT = RAE.time_shift(SHAPE)

# Tolerances, from float32 error propagation (u = 2^-24 ≈ 6e-8):
# - MODEL_REL: one network call agrees with RAE's to 1e-5 of its output's magnitude, the bound the DiT and
#   SiT parity tests hold on every CPU (GEMMs may sum their dot products in another order, ~sqrt(K)·u
#   per layer over a few layers; measured here ~5e-7).
# - GRID_ABS: fastdit writes RAE's grid σ_k = s u / (1 + (s − 1) u), u = 1 − k/(N−1)·0.999, as
#   t_k = v / (v + s (1 − v)) in flow time and calls the network at 1 − t_k: a few roundings of numbers
#   in [0, 1], each <= u/2 ulp of 1: 4u.
# - A step from RAE's state x_k adds the model's error through the step's coefficients: guidance
#   D0 + w (D1 − D0) multiplies it by up to w + (w − 1) = 2w − 1 (classifier-free: conditional and
#   unconditional; AutoGuidance: the model and its guide), the step by |dt|; a time off by GRID_ABS moves
#   x by GRID_ABS·|v| through dt, and v itself by at most LIPSCHITZ_T·GRID_ABS (|∂v/∂t| of these tiny
#   networks is below 50 on every state of the runs: the Fourier features 2π·W·t with |W| <= 4).
# - Whole runs from z accumulate the local errors; the end-to-end check uses the SiT fixtures' 1e-4·max|ref|.
# - DRAW_ABS: a training σ is erf, erfinv, sigmoid and the shift of a uniform, the same float32 operations
#   as RAE's (bit for bit on the kernels the fixture was made with); PyTorch's scalar and vector kernels
#   of erfinv and sigmoid round differently by an ulp or two (seen: 2 ulp under ATEN_CPU_CAPABILITY=default),
#   and the shift's slope s / (1 + (s − 1) σ)² <= s = sqrt(8) carries that on: 16 ulp of 1.
MODEL_REL = 1e-5
DRAW_ABS = 16 * 2**-24
GRID_ABS = 4 * 2**-24
LIPSCHITZ_T = 50.0
TRAJECTORY_REL = 1e-4


def assert_within(actual, expected, bound, what=""):
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"{what}: max |diff| {err:.3e} > bound {bound:.3e}"


def fastdit_config(params: dict) -> DiTConfig:
    """RAE's `DiTwDDTHead(**params)` as a DiTConfig: [body, head] pairs of width, depth and heads."""
    return DiTConfig(input_size=params["input_size"], patch_size=params["patch_size"], in_channels=params["in_channels"],
                     hidden_size=params["hidden_size"][0], depth=params["depth"][0], num_heads=params["num_heads"][0],
                     head_hidden_size=params["hidden_size"][1], head_depth=params["depth"][1],
                     head_num_heads=params["num_heads"][1], mlp_ratio=params["mlp_ratio"],
                     class_dropout_prob=params["class_dropout_prob"], num_classes=params["num_classes"],
                     learn_sigma=False, norm="rmsnorm" if params["use_rmsnorm"] else "layernorm",
                     mlp="swiglu" if params["use_swiglu"] else "gelu", rope=params["use_rope"],
                     qk_norm=params["use_qknorm"])


def network(name: str):
    model = build_from_config(fastdit_config(FIXTURE["configs"][name])).eval()
    model.load_state_dict(FIXTURE["state_dicts"][name], strict=True)  # RAE's names and shapes, every key
    return model


@pytest.fixture(scope="module")
def models():
    return {name: network(name) for name in ("paper", "guide")}


# ------------------------------------------------------------------------------------------------
# the network and its layout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["paper", "options"])
def test_forward_matches_rae(name):
    case = FIXTURE["forward"]  # t = 0, 0.3, 0.77, 1 (RAE's σ), the last label the null class
    with torch.no_grad():
        out = network(name)(case["x"], case["t"], case["y"])
    assert_within(out, case[name], MODEL_REL * case[name].abs().max().item(), f"{name} forward")


@pytest.mark.parametrize("name", ["paper", "options", "guide"])
def test_tiny_layouts_are_raes_key_for_key(name):
    ours = {key: list(value.shape) for key, value in build_from_config(fastdit_config(FIXTURE["configs"][name])).state_dict().items()}
    assert ours == LAYOUTS[name]["keys"]


@pytest.mark.parametrize("path, preset", [
    ("configs/stage2/training/ImageNet256/DiTDH-S_DINOv2-B.yaml", "DiTDH-S"),
    ("configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml", "DiTDH-XL"),
    ("configs/stage2/sampling/ImageNet512/DiTDH-XL_DINOv2-B_decXL_AG.yaml", "DiTDH-XL"),
])
def test_presets_are_raes_configs_key_for_key(path, preset):
    rae = LAYOUTS[path]
    with torch.device("meta"):
        model = build_model(preset, input_size=rae["params"]["input_size"], in_channels=rae["params"]["in_channels"],
                            num_classes=rae["params"]["num_classes"])
    assert fastdit_config(rae["params"]) == model.config  # the preset is RAE's config, field for field
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == rae["keys"]


# ------------------------------------------------------------------------------------------------
# the time shift
# ------------------------------------------------------------------------------------------------


def test_shift_of_every_rae_config_and_preset():
    from fastdit.sampling.presets import PRESETS

    configs = FIXTURE["shift"]["configs"]
    default = build_objective("rae")  # RAE's base 4096
    for path, case in configs.items():
        assert default.time_shift(tuple(case["latent_size"])) == case["shift"], path  # the same sqrt of the same ratio
    sampling = {"rae-ditdh-xl-256": "configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B.yaml",
                "rae-ditdh-xl-256-ag": "configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B_AG.yaml",
                "rae-ditdh-xl-512-ag": "configs/stage2/sampling/ImageNet512/DiTDH-XL_DINOv2-B_decXL_AG.yaml"}
    for preset, path in sampling.items():
        assert PRESETS[preset].recipe["time_shift"] == configs[path]["shift"]


@pytest.mark.parametrize("key", sorted(FIXTURE["shift"]["grids"]))
def test_sampling_grid_is_raes_shifted_grid(key):
    case = FIXTURE["shift"]["grids"][key]
    view = ModelView(RAE, None, torch.zeros(1, dtype=torch.long), learn_sigma=False, time_shift=case["shift"])
    times = view.ode_times(len(case["times"]))  # flow time: what the registered ODE samplers integrate over
    assert_within(1 - times, case["times"], GRID_ABS, "grid")


@pytest.mark.parametrize("kind, mean, std", [("logit-normal_0_1", 0.0, 1.0), ("logit-normal_0.5_0.8", -0.5, 0.8)])
def test_training_draws_are_raes(kind, mean, std):
    # RAE's logit-normal mean is of its σ; fastdit's --logit-normal-mean is in flow time, t = 1 − σ: −0.5.
    case = FIXTURE["shift"]["training_draws"][kind]
    objective = build_objective("rae", time_shift_base=FIXTURE["shift_base"], logit_normal_mean=mean, logit_normal_std=std)
    assert_within(objective.noise_levels(case["u"], SHAPE), case["t"], DRAW_ABS, "σ")  # RAE's operations
    # The draw the training loop makes: a uniform from the sample's generator, mapped so.
    generator = torch.Generator().manual_seed(5)
    u = torch.rand(1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(objective.draw(SHAPE, generator, torch.device("cpu"))["sigma"], objective.noise_levels(u, SHAPE))


def test_training_loss(models):
    case = FIXTURE["training_loss"]
    assert_within(RAE.noise_levels(case["u"], SHAPE), case["sigma"], DRAW_ABS, "σ")  # RAE's draws of this loss
    conditions = {"y": case["y"], "force_drop_ids": torch.zeros_like(case["y"], dtype=torch.bool)}
    seen = {}

    def forward(x, sigma, **kwargs):
        seen.update(x=x, sigma=sigma)
        return models["paper"](x, sigma, **kwargs)

    with torch.no_grad():
        loss = RAE.losses(TrainingNetwork.of(forward), case["x1"], {"sigma": case["sigma"], "noise": case["noise"]},
                          conditions)["loss"]
    assert torch.equal(seen["x"], case["x_sigma"]) and torch.equal(seen["sigma"], case["sigma"])  # RAE's x_σ, exactly
    # The loss is a mean of squares of (pred − (ε − x)): its error is 2·|pred − target|·|Δpred| at most.
    target = case["noise"] - case["x1"]
    pred_error = MODEL_REL * case["pred"].abs().max().item()
    bound = 2 * (case["pred"] - target).abs().max().item() * pred_error + pred_error**2 + 8 * 2**-24 * case["loss"].max().item()
    assert_within(loss, case["loss"], bound, "loss")


# ------------------------------------------------------------------------------------------------
# sampling: Euler and Heun, unguided, classifier-free and AutoGuidance, with and without an interval
# ------------------------------------------------------------------------------------------------


class ScriptedNoise:
    """`PerImageNoise`'s interface: the start is the fixture's z; the ODE samplers draw nothing else."""

    def draw(self, shape_per_image, dtype=torch.float32):
        assert tuple(shape_per_image) == SHAPE
        return SAMPLING["z"].clone()

    def __call__(self, like):
        raise AssertionError("an ODE sampler drew noise")


def public_options(run: dict, method: str, num_steps: int) -> SamplingOptions:
    """What `fastdit sample --sampler M --num-sampling-steps N --time-shift S --cfg-scale W
    [--guidance-interval 1-b 1-a] [--guidance-model GUIDE]` asks for, for RAE's run `run`."""
    interval = None if run["interval"] in (None, [0.0, 1.0]) else (1 - run["interval"][1], 1 - run["interval"][0])
    return SamplingOptions(sampler=method, num_steps=num_steps, cfg_scale=run["scale"], guidance_interval=interval,
                           guidance_model="guide.pt" if run["guide"] else None, time_shift=SHIFT)


def attach(options: SamplingOptions, run: dict, models) -> SamplingOptions:
    if run["guide"]:
        options.attach_guidance_network(models[run["guide"]])  # what load_for_sampling does with --guidance-model
    return options


RUNS = {name: (("heun", 6) if name.startswith("heun2") else ("euler", 8)) for name in SAMPLING["runs"]}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_whole_run_matches_rae(models, name):
    run = SAMPLING["runs"][name]
    options = attach(public_options(run, *RUNS[name]), run, models)
    options.validate(RAE)
    final = sample_latents(models["paper"], SAMPLING["y"], objective=RAE, options=options, noise=ScriptedNoise())
    reference = run["trajectory"][-1]
    assert_within(final, reference, TRAJECTORY_REL * reference.abs().max().item(), name)


@pytest.mark.parametrize("name", sorted(n for n in RUNS if n.startswith("euler")))
def test_every_euler_step_from_raes_state(models, name):
    """Each step of RAE's trajectory, redone by fastdit's public velocity from RAE's own state."""
    run = SAMPLING["runs"][name]
    options = attach(public_options(run, "euler", 8), run, models)
    velocity = ModelView(RAE, guided_model(models["paper"], RAE, options), SAMPLING["y"], learn_sigma=False,
                         time_shift=SHIFT).velocity
    times = ModelView(RAE, None, SAMPLING["y"], learn_sigma=False, time_shift=SHIFT).ode_times(8)
    gain = 2 * run["scale"] - 1
    trajectory = run["trajectory"]
    for k in range(len(times) - 1):
        x, dt = trajectory[k], times[k + 1] - times[k]
        with torch.no_grad():
            v = velocity(x, times[k].expand(len(x)), SAMPLING["y"])
        scale = v.abs().max().item()
        bound = (abs(dt.item()) * (gain * MODEL_REL * scale + LIPSCHITZ_T * GRID_ABS) + 2 * GRID_ABS * scale
                 + 4 * 2**-24 * x.abs().max().item())
        assert_within(x + dt * v, trajectory[k + 1], bound, f"{name} step {k}")


def test_autoguidance_runs_the_guide_only_inside_the_interval(models):
    run = SAMPLING["runs"]["euler_8_ag_0.3_0.8"]
    calls = []

    def counting(x, t, y):
        calls.append(t[0].item())
        return models["guide"](x, t, y)

    options = public_options(run, "euler", 8)
    options.attach_guidance_network(counting)
    sample_latents(models["paper"], SAMPLING["y"], objective=RAE, options=options, noise=ScriptedNoise())
    sigmas = 1 - ModelView(RAE, None, SAMPLING["y"], learn_sigma=False, time_shift=SHIFT).ode_times(8)[:-1]
    inside = [s.item() for s in sigmas if 0.3 <= s <= 0.8]
    assert 0 < len(inside) < len(sigmas) and calls == pytest.approx(inside, abs=GRID_ABS)
