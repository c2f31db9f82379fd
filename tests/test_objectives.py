"""The objective is a recorded choice: training writes it, loading reads it, sampling rebuilds it; a sampler
that does not fit is refused; guidance intervals behave the same for every objective."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fastdit import hub
from fastdit.checkpoint import load_model
from fastdit.errors import UserError
from fastdit.latents import PixelSpace
from fastdit.models import build_model
from fastdit.objectives import TrainingNetwork, build_objective, objective_from_dict
from fastdit.sampling import SamplingOptions, generate
from fastdit.train.loop import train
from test_train import FLOW_FIELDS, tiny_config
from cli_runner import run_cli


@pytest.fixture(scope="module")
def flow_export(tmp_path_factory):
    result = train(tiny_config(tmp_path_factory.mktemp("flow"), max_steps=2, ckpt_every=2, **FLOW_FIELDS))
    return result


def test_training_records_the_process_and_the_blocks(flow_export):
    model, info = load_model(flow_export.export)
    assert info.objective == build_objective("flow", time_sampling="logit-normal")
    assert (model.config.norm, model.config.mlp, model.config.rope, model.config.qk_norm) == ("rmsnorm", "swiglu", True, True)
    # The full training checkpoint records the same, and so does the export's metadata itself.
    _, from_checkpoint = load_model(flow_export.checkpoint)
    assert from_checkpoint.objective == info.objective
    with safe_open(str(flow_export.export), framework="pt") as handle:
        assert '"objective": "flow"' in handle.metadata()["model_info"]


def test_sampling_rebuilds_the_process_from_the_checkpoint(flow_export, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert run_cli("sample", "--ckpt", flow_export.export, "--num-sampling-steps", 4, "--vae", "pixels",
                   "--class-labels", 1, 2, "--out", out, "--no-progress") == 0
    assert "sde-euler 4 steps" in capsys.readouterr().out  # the flow's own default, not DDPM
    assert run_cli("sample", "--ckpt", flow_export.export, "--sampler", "ddpm", "--out", out) == 2
    assert ("sampler 'ddpm' does not fit this flow model; use one of: sde-euler, sde-heun, euler, heun, dopri5, ddim, dpm++2m"
            in capsys.readouterr().err)
    assert run_cli("sample", "--ckpt", flow_export.export, "--guidance-interval", 0.8, 0.2, "--out", out) == 2
    assert "guidance interval (0.8, 0.2) must lie in this flow model's time range [0, 1] with LOW <= HIGH" in capsys.readouterr().err
    assert run_cli("sample", "--ckpt", flow_export.export, "--objective", "ddpm", "--out", out) == 2
    assert "holds a flow model, not ddpm; drop --objective" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["sde-euler", "sde-heun", "euler", "heun", "ddim", "dpm++2m"])
def test_every_flow_sampler_runs_from_a_checkpoint(flow_export, sampler):
    model, info = load_model(flow_export.export)
    options = SamplingOptions(sampler=sampler, num_steps=4, cfg_scale=2.0, time_shift=2.0)
    images = generate(model, PixelSpace(1), [0, 5], options=options, objective=info.objective, seed=3)
    assert images.shape == (2, 8, 8, 1)
    again = generate(model, PixelSpace(1), [0, 5], options=options, objective=info.objective, seed=3)
    assert np.array_equal(images, again)


def tiny_ddpm():
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=1, num_classes=10).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("objective, full, empty", [("ddpm", (0, 999), (400, 410)), ("flow", (0, 1), (0.3, 0.31))])
def test_guidance_interval_full_is_plain_guidance_and_empty_is_none(objective, full, empty):
    # DDPM-5 visits timesteps 999, 749, 500, 250, 0 (none in [400, 410]); a flow ODE Euler grid of 5
    # points visits t = 0, .25, .5, .75 (none in [0.3, 0.31]).
    model, trained_for = tiny_ddpm(), build_objective(objective)
    sampler = "ddpm" if objective == "ddpm" else "euler"

    def run(**options):
        options = SamplingOptions(sampler=sampler, num_steps=5, **options)
        return generate(model, PixelSpace(3), [1, 4], options=options, objective=trained_for, seed=0)

    guided, unguided = run(cfg_scale=3.0), run(cfg_scale=1.0)
    assert not np.array_equal(guided, unguided)
    assert np.array_equal(run(cfg_scale=3.0, guidance_interval=full), guided)
    assert np.array_equal(run(cfg_scale=3.0, guidance_interval=empty), unguided)


def test_outside_the_interval_the_model_runs_once_on_the_plain_batch():
    model, calls = tiny_ddpm(), []

    def counting(x, t, y):
        calls.append((len(x), int(t[0])))
        return model(x, t, y)

    counting.config = model.config
    options = SamplingOptions(sampler="ddpm", num_steps=5, cfg_scale=3.0, guidance_interval=(600, 999))
    generate(counting, PixelSpace(3), [1, 4], options=options, objective=build_objective("ddpm"), seed=0)
    # Timesteps 999 and 749 are guided (a doubled batch of 4), 500, 250 and 0 are not (2 rows, one call).
    assert calls == [(4, 999), (4, 749), (2, 500), (2, 250), (2, 0)]


def test_bad_objective_settings_are_user_errors():
    with pytest.raises(UserError, match="unknown objective 'score'; choose one of: ddpm, flow, x-pred"):
        build_objective("score")
    with pytest.raises(UserError, match="unknown time sampling 'beta'"):
        build_objective("flow", time_sampling="beta")
    with pytest.raises(UserError, match="--time-sampling applies to the flow and x-pred objective"):
        build_objective("ddpm", time_sampling="logit-normal")
    with pytest.raises(UserError, match="sampler 'euler' does not fit this ddpm model"):
        SamplingOptions(sampler="euler").validate(build_objective("ddpm"))
    with pytest.raises(UserError, match="guidance interval .* is reversed"):
        from fastdit.sampling import ClassifierFreeGuidance

        ClassifierFreeGuidance(tiny_ddpm(), 2.0, 10, 3, interval=(5, 1))


def test_checkpoints_from_before_the_objective_was_recorded_are_ddpm():
    assert objective_from_dict(None) == build_objective("ddpm")
    # What files recorded as their "process" before objectives were objects: the flow's settings at their
    # defaults on a DDPM model too.
    recorded = {"objective": "ddpm", "time_sampling": "uniform", "logit_normal_mean": 0.0, "logit_normal_std": 1.0}
    assert objective_from_dict(recorded) == build_objective("ddpm")
    flow = {"objective": "flow", "time_sampling": "logit-normal", "logit_normal_mean": 0.5, "logit_normal_std": 1.0}
    assert objective_from_dict(flow) == build_objective("flow", time_sampling="logit-normal", logit_normal_mean=0.5)


def test_official_sit_name_downloads_into_its_own_cache_and_loads_as_a_flow(tmp_path, monkeypatch, file_server):
    # The release is XL (2.7 GB); the same path is exercised with a tiny network registered under its name.
    import io

    model = build_model("DiT-T/2", input_size=32, num_classes=1000)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # the released file: a plain state dict
    payload = buffer.getvalue()
    file_server.files["/SiT-XL-2-256.pt"] = payload
    monkeypatch.setattr(hub, "OFFICIAL_SIT_URL", f"http://127.0.0.1:{file_server.server_address[1]}/SiT-XL-2-256.pt")
    monkeypatch.setitem(hub.OFFICIAL_CHECKPOINTS, "SiT-XL-2-256x256.pt", ("SiT-T/2", 256))
    loaded, info = load_model("SiT-XL-2-256x256.pt")
    assert (hub.cache_dir() / "sit" / "SiT-XL-2-256x256.pt").read_bytes() == payload
    assert info.objective.name == "flow" and info.objective.sampling.sampler == "sde-euler"
    assert info.config.num_classes == 1000 and info.image_size == 256


def test_official_names_know_their_objective():
    assert hub.official_objective("SiT-XL/2") == "flow" and hub.official_objective("DiT-XL/2") == "ddpm"
    assert hub.official_url("SiT-XL-2-256x256.pt") == hub.OFFICIAL_SIT_URL
    assert hub.official_url("DiT-XL-2-512x512.pt").endswith("/DiT-XL-2-512x512.pt")


# ----------------------------------------------------------------------------------------------
# x-prediction (JiT): the derived velocity and the loss against float64
# ----------------------------------------------------------------------------------------------


def test_x_prediction_loss_and_velocity_match_a_direct_float64_computation():
    from fastdit.objectives import OBJECTIVES

    objective = build_objective("x-pred")
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 3, 4, 4, generator=generator)
    noise = torch.randn(4, 3, 4, 4, generator=generator)
    # 0.99 and 1.0 lie past 1 − t_eps = 0.95: there the gap is clipped to t_eps, as JiT does.
    t = torch.tensor([0.0, 0.3, 0.99, 1.0])
    # A fixed "network": the clean-image guess plus 3 variance channels that must be ignored.
    output = torch.randn(4, 6, 4, 4, generator=generator)

    def network(x_t, time, y):
        return output.to(x_t.dtype)

    loss = objective.losses(TrainingNetwork.of(network), x1, {"t": t, "noise": noise}, {"y": None})["loss"]
    x1_, noise_, t_, out_ = x1.double(), noise.double(), t.double(), output.double()[:, :3]
    x_t = t_.view(-1, 1, 1, 1) * x1_ + (1 - t_.view(-1, 1, 1, 1)) * noise_
    gap = torch.clamp(1 - t_, min=0.05).view(-1, 1, 1, 1)
    velocity = (out_ - x_t) / gap
    expected = ((velocity - (x1_ - noise_)) ** 2).mean(dim=(1, 2, 3))
    # float32 rounds x_t and the difference x̂1 − x_t by about 3u of their size (u = 2^-24 ≈ 6e-8, sizes
    # ≤ 5 here), and dividing by the gap (≥ 0.05) scales that by ≤ 20: per element ≤ 3u·5·20 ≈ 2e-5 of
    # error against velocity differences of size ~10, so the mean square moves by ≤ 2·2e-5/10 ≈ 4e-6
    # relative. rtol 2e-5 keeps a factor 5 above that; a wrong clip (0.01 instead of 0.05) or a loss on
    # x̂1 instead of the velocity changes the result by far more.
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=0)
    # The view samplers integrate is the same derived velocity.
    view = objective.velocity(network)(x_t.float(), t, None)
    torch.testing.assert_close(view.double(), velocity, rtol=2e-5, atol=2e-5 * velocity.abs().max().item())
    assert "x-pred" in OBJECTIVES and objective.sampling.sampler == "heun"


def test_x_prediction_offers_every_flow_sampler_and_records_its_settings():
    from fastdit.sampling import samplers_for

    assert samplers_for("x-pred") == samplers_for("flow")
    jit = build_objective("x-pred", time_sampling="logit-normal", logit_normal_mean=-0.8, logit_normal_std=0.8)
    assert objective_from_dict(jit.to_dict()) == jit
    assert jit.to_dict() == {"objective": "x-pred", "time_sampling": "logit-normal", "logit_normal_mean": -0.8,
                             "logit_normal_std": 0.8, "x_pred_t_eps": 0.05}
    with pytest.raises(UserError, match=r"--x-pred-t-eps must be in \[1.19e-07, 1\] .*, got 0.0; JiT uses 0.05"):
        build_objective("x-pred", x_pred_t_eps=0.0)
    with pytest.raises(UserError, match="--x-pred-t-eps applies to the x-pred objective"):
        build_objective("flow", x_pred_t_eps=0.1)


@pytest.fixture(scope="module")
def x_pred_export(tmp_path_factory):
    fields = dict(objective="x-pred", time_sampling="logit-normal", logit_normal_mean=-0.8, logit_normal_std=0.8)
    return train(tiny_config(tmp_path_factory.mktemp("xpred"), max_steps=2, ckpt_every=2, **fields))


@pytest.mark.parametrize("sampler", ["sde-euler", "sde-heun", "euler", "heun", "ddim", "dpm++2m"])
def test_every_flow_sampler_samples_an_x_prediction_model(x_pred_export, sampler):
    model, info = load_model(x_pred_export.export)
    assert info.objective.name == "x-pred"
    options = SamplingOptions(sampler=sampler, num_steps=4, cfg_scale=2.0, time_shift=2.0)
    images = generate(model, PixelSpace(1), [0, 5], options=options, objective=info.objective, seed=3)
    assert images.shape == (2, 8, 8, 1)


# ----------------------------------------------------------------------------------------------
# The sampler registry
# ----------------------------------------------------------------------------------------------


def test_ddim_without_noise_on_the_flow_path_is_euler():
    # The registry runs DDIM(η = 0) of a flow-time objective as Euler's method (one implementation):
    # DDIM with K model calls is Euler on the grid of K + 1 points.
    from fastdit.sampling import ddim, flow_grid, ode_euler, time_grid

    model, flow, labels = tiny_ddpm(), build_objective("flow"), torch.tensor([1, 4])

    def run(sampler, num_steps):
        options = SamplingOptions(sampler=sampler, num_steps=num_steps, cfg_scale=1.0)
        return generate(model, PixelSpace(3), labels, options=options, objective=flow, seed=0)

    assert np.array_equal(run("ddim", 8), run("euler", 9))
    # The generic grid DDIM agrees: the same algebra, with float64 coefficients instead of float32 steps.
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    velocity = flow.velocity(model)
    with torch.no_grad():
        euler = ode_euler(velocity, noise, time_grid(9), cond={"y": labels})
        grid = ddim(flow_grid(velocity, labels, time_grid(9)), noise)
    # 8 steps, each rounding x + dt·v to ~2u of max|x| in float32 against float64 coefficients (u ≈ 6e-8),
    # carried through a model whose Lipschitz constant is O(1): ≤ 8·2u·e ≈ 3e-6 of max|x|; 1e-5 keeps a margin.
    torch.testing.assert_close(euler, grid, rtol=0, atol=1e-5 * grid.abs().max().item())


def test_sampler_options_are_checked_by_the_registry():
    with pytest.raises(UserError, match="eta is an option of the ddim sampler only, not of 'euler'"):
        SamplingOptions(sampler="euler", eta=0.5).validate(build_objective("flow"))
    with pytest.raises(UserError, match="unknown sampler 'rk45'; for this x-pred model use one of: sde-euler"):
        SamplingOptions(sampler="rk45").validate(build_objective("x-pred"))


def test_an_objective_registers_with_its_settings_and_gets_the_samplers_of_its_views():
    from dataclasses import dataclass
    from typing import ClassVar

    from fastdit.objectives import OBJECTIVES, register_objective, setting
    from fastdit.objectives.flow import Flow
    from fastdit.sampling import samplers_for

    @dataclass
    class Clipped(Flow):
        name: ClassVar[str] = "clipped-flow"
        velocity_clip: float = setting(10.0, "clip the velocity to this size")

    try:
        register_objective(Clipped)
        assert samplers_for("clipped-flow") == samplers_for("flow")
        assert build_objective("clipped-flow", velocity_clip=3.0).to_dict()["velocity_clip"] == 3.0
        with pytest.raises(ValueError, match="registered already"):
            register_objective(Clipped)
    finally:
        OBJECTIVES.pop("clipped-flow", None)

    @dataclass
    class Conflicting(Flow):
        name: ClassVar[str] = "conflicting"
        time_sampling: str = setting("logit-normal", "another default for a shared flag")

    with pytest.raises(ValueError, match="differs from another objective's setting"):
        register_objective(Conflicting)
    assert "conflicting" not in OBJECTIVES


def test_sit_path_and_prediction_are_training_flags_recorded_for_sampling(tmp_path, capsys):
    """`--path-type gvp --prediction noise --loss-weight likelihood` train SiT's GVP noise model; the
    checkpoint records them, and `fastdit sample --ckpt` converts the noise to a velocity and a score
    as SiT does (with SiT's SDE flags); settings that do not apply are refused at the edge."""
    flags = ["--data-path", "digits", "--model", "DiT-T/2", "--image-size", 8, "--num-classes", 10, "--depth", 1,
             "--hidden-size", 32, "--num-heads", 2, "--global-batch-size", 8, "--num-workers", 0, "--max-steps", 1,
             "--ckpt-every", 1, "--no-progress", "--no-tensorboard", "--results-dir", tmp_path, "--objective", "flow"]
    assert run_cli("train", *flags, "--path-type", "gvp", "--prediction", "noise", "--loss-weight", "likelihood") == 0
    export = next((tmp_path).rglob("*-ema.safetensors"))
    _, info = load_model(export)
    assert info.objective == build_objective("flow", path_type="gvp", prediction="noise", loss_weight="likelihood")
    assert info.objective.sample_interval() == (1e-3, 1 - 1e-3)  # SiT's eps for a noise model
    capsys.readouterr()
    out = tmp_path / "grid.png"
    assert run_cli("sample", "--ckpt", export, "--num-sampling-steps", 4, "--class-labels", 1, "--out", out,
                   "--diffusion-form", "sbdm", "--last-step", "tweedie", "--last-step-size", 0.1, "--no-progress") == 0
    assert "sde-euler 4 steps" in capsys.readouterr().out
    # DDIM and DPM-Solver++ run on the linear path's velocity grid only; SDE flags need an SDE sampler.
    assert run_cli("sample", "--ckpt", export, "--sampler", "ddim", "--out", out) == 2
    assert "sampler 'ddim' does not fit this flow model; use one of: sde-euler, sde-heun, euler, heun, dopri5" in \
        capsys.readouterr().err
    assert run_cli("sample", "--ckpt", export, "--sampler", "heun", "--diffusion-norm", 2, "--out", out) == 2
    assert "diffusion norm is an option of the sde-euler and sde-heun samplers only, not of 'heun' (--diffusion-norm)" in \
        capsys.readouterr().err
    assert run_cli("train", *flags, "--prediction", "velocity", "--loss-weight", "velocity") == 2
    assert "applies to noise and score prediction only" in capsys.readouterr().err
    assert run_cli("train", *flags[:-1], "x-pred", "--path-type", "vp") == 2
    assert "--path-type applies to the flow objective(s), not to x-pred" in capsys.readouterr().err


def test_a_velocity_model_on_the_linear_path_refuses_sbdm_and_heun_without_a_last_step():
    flow = build_objective("flow")
    with pytest.raises(UserError, match="the --diffusion-form sbdm diffusion is infinite at t = 0"):
        SamplingOptions(sampler="sde-euler", diffusion_form="sbdm").validate(flow)
    with pytest.raises(UserError, match="ends at t = 1, where stochastic Heun would take the score"):
        SamplingOptions(sampler="sde-heun", last_step="none").validate(flow)
    SamplingOptions(sampler="sde-euler", last_step="none").validate(flow)  # Euler–Maruyama never evaluates at t = 1
    SamplingOptions(sampler="sde-heun", diffusion_form="sbdm").validate(build_objective("flow", prediction="score"))
