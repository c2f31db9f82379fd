"""The objective is a recorded choice: training writes it, loading reads it, sampling rebuilds it; a sampler
that does not fit is refused; guidance intervals behave the same for every objective."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fastdit import hub
from fastdit.checkpoint import load_model
from fastdit.cli import main
from fastdit.errors import UserError
from fastdit.latents import PixelSpace
from fastdit.models import build_model
from fastdit.objectives import build_objective, objective_from_dict
from fastdit.sampling import SamplingOptions, generate
from fastdit.train.loop import train
from test_train import FLOW_FIELDS, tiny_config


def run_cli(*args):
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code


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


def test_official_sit_name_downloads_into_its_own_cache_and_loads_as_a_flow(tmp_path, monkeypatch):
    # The release is XL (2.7 GB); the same path is exercised with a tiny network registered under its name.
    import http.server
    import io
    import threading

    model = build_model("DiT-T/2", input_size=32, num_classes=1000)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # the released file: a plain state dict
    payload = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(hub, "OFFICIAL_SIT_URL", f"http://127.0.0.1:{httpd.server_address[1]}/SiT-XL-2-256.pt")
        monkeypatch.setitem(hub.OFFICIAL_CHECKPOINTS, "SiT-XL-2-256x256.pt", ("SiT-T/2", 256))
        loaded, info = load_model("SiT-XL-2-256x256.pt")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (hub.cache_dir() / "sit" / "SiT-XL-2-256x256.pt").read_bytes() == payload
    assert info.objective.name == "flow" and info.objective.default_sampler == "sde-euler"
    assert info.config.num_classes == 1000 and info.image_size == 256


def test_official_names_know_their_objective():
    assert hub.official_objective("SiT-XL/2") == "flow" and hub.official_objective("DiT-XL/2") == "ddpm"
    assert hub.official_url("SiT-XL-2-256x256.pt") == hub.OFFICIAL_SIT_URL
    assert hub.official_url("DiT-XL-2-512x512.pt").endswith("/DiT-XL-2-512x512.pt")
