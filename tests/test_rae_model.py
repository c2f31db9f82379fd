"""DiT^DH (a DiT with RAE's DDT head) everywhere a DiT goes: presets, the model record, loading RAE's own
checkpoints and fastdit's exports strictly, `fastdit sample` and `sample-ddp` with AutoGuidance (and
its refusals), training with the `rae` objective (its recorded time shift, its extensions, FSDP2, bf16,
compile), and the export of a run read key for key against RAE's own layout (made by RAE's code:
tests/fixtures/rae-model/rae_layouts.json)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_runner import run_cli
from fastdit.checkpoint import export_weights, load_guidance_model, load_model
from fastdit.errors import UserError
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.models import DITDH_PRESETS, DiT, DiTConfig, DiTDH, build_model, config_from_name, preset_of
from fastdit.objectives import build_objective
from fastdit.sampling import SamplingOptions

LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "rae-model" / "rae_layouts.json").read_text())
PIXELS = LatentInfo(kind="pixels", vae=None, scale_factor=1.0)


def random_ditdh(seed: int = 0, **fields) -> DiTDH:
    """DiTDH-T on 8x8 RGB pixels with every weight random (its adaLN-Zero start would output zeros)."""
    torch.manual_seed(seed)
    model = build_model("DiTDH-T", **{"input_size": 8, "in_channels": 3, "num_classes": 10, **fields})
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# the architecture and its presets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DITDH_PRESETS))
def test_every_ditdh_preset_builds_with_raes_defaults(name):
    with torch.device("meta"):
        model = build_model(name)
    config = model.config
    assert isinstance(model, DiTDH) and preset_of(config) == name
    assert (config.patch_size, config.input_size, config.in_channels, config.learn_sigma) == (1, 16, 768, False)
    assert (config.norm, config.mlp, config.rope, config.qk_norm) == ("rmsnorm", "swiglu", True, False)
    assert len(model.blocks) == config.depth + config.head_depth
    if name != "DiTDH-T":
        assert (config.head_depth, config.head_hidden_size, config.head_num_heads) == (2, 2048, 16)


def test_ditdh_xl_has_raes_parameter_count():
    # RAE's DiT^DH-XL config (its configs/stage2/sampling/ImageNet256), built by RAE's code: the same keys and
    # shapes (tests/test_rae_model_parity.py), so the same count: 839M, as the paper reports.
    keys = LAYOUTS["configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml"]["keys"]
    with torch.device("meta"):
        model = build_model("DiTDH-XL")
    assert sum(p.numel() for p in model.state_dict().values()) == sum(math.prod(s) for s in keys.values())
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 839


@pytest.mark.parametrize("fields, message", [
    (dict(head_depth=2), "a DDT head needs head_hidden_size >= 1"),
    (dict(head_depth=1, head_hidden_size=96, head_num_heads=5), "head dimension divisible by 4"),
    (dict(head_depth=1, head_hidden_size=96, head_num_heads=4, rope=False), "leave rope on"),
    (dict(head_depth=1, head_hidden_size=96, head_num_heads=4, rope=True, time_gap_embedding=True), "train MeanFlow"),
])
def test_head_settings_that_cannot_work_are_one_line(fields, message):
    base = dict(input_size=4, hidden_size=64, num_heads=4, depth=1, rope=True)
    with pytest.raises(UserError, match=message):
        DiTConfig(**{**base, **fields})


def test_a_plain_dit_never_takes_a_head_config():
    config = config_from_name("DiTDH-T", depth=1, input_size=4)
    with pytest.raises(ValueError, match="build_from_config"):
        DiT(config)


def test_routing_runs_a_span_of_the_body_on_the_kept_tokens():
    from fastdit.models.routing import TokenRoute

    model = random_ditdh(depth=3)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    every = torch.arange(64).expand(2, 64)
    with torch.no_grad():
        plain = model(x, t, y)
        # Keeping every token is the plain forward: the span, its gathers and the rejoin change nothing.
        torch.testing.assert_close(model(x, t, y, route=TokenRoute(every, 1, 2)), plain, rtol=1e-5, atol=1e-6)
        routed = model(x, t, y, route=TokenRoute(every[:, ::2], 1, 3))
    assert routed.shape == plain.shape and not torch.allclose(routed, plain)
    with pytest.raises(ValueError, match="span"):  # the head's blocks are no span of the body
        model(x, t, y, route=TokenRoute(every, 2, 5))


# ------------------------------------------------------------------------------------------------
# the record, exports and RAE's own checkpoints
# ------------------------------------------------------------------------------------------------


def test_export_round_trip_records_the_head_objective_and_shift(tmp_path):
    model = random_ditdh()
    objective = build_objective("rae", time_shift_base=16)
    from fastdit.sampling.recipe import training_recipe

    recipe = training_recipe(objective, conditional=True, input_shape=(3, 8, 8))
    assert recipe == {"sampler": "euler", "num_steps": 50, "time_shift": math.sqrt(3 * 8 * 8 / 16)}
    info = ModelInfo(config=model.config, latent=PIXELS, objective=objective, sampling=recipe)
    record = info.to_dict()
    assert record["preset"] == "DiTDH-T" and record["model"]["head_hidden_size"] == 256
    assert record["objective"] == {"objective": "rae", "logit_normal_mean": 0.0, "logit_normal_std": 1.0,
                                   "time_shift_base": 16}
    path = export_weights(model, info, tmp_path / "m.safetensors")
    loaded, back = load_model(path)
    assert isinstance(loaded, DiTDH) and back.config == model.config and back.sampling == recipe
    assert back.objective.to_dict() == objective.to_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_raes_training_checkpoint_loads_strictly_and_knows_what_it_is(tmp_path):
    """A file as RAE's train.py writes it (its EMA under "ema", beside "model" and the optimizer), its
    config read from RAE's key names and shapes: the `rae` objective and RAE's sampling (Euler, 50 points,
    its time shift, unguided)."""
    model = random_ditdh()
    path = tmp_path / "ep-0000001.pt"
    torch.save({"step": 1, "epoch": 1, "model": model.state_dict(), "ema": model.state_dict(), "optimizer": {},
                "scheduler": None}, path)
    loaded, info = load_model(path, vae="pixels")
    assert info.config == model.config and preset_of(info.config) == "DiTDH-T"
    assert info.objective.name == "rae" and info.objective.time_shift_base == 4096
    assert info.sampling == {"sampler": "euler", "num_steps": 50, "cfg_scale": 1.0,
                             "time_shift": math.sqrt(3 * 8 * 8 / 4096)}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # Another layout's file names what differs, in one line.
    torch.save(build_model("DiT-T/2", input_size=8, in_channels=3, num_classes=10).state_dict(), tmp_path / "dit.pt")
    with pytest.raises(UserError, match="does not fit this model"):
        load_model(tmp_path / "dit.pt", model_name="DiTDH-T", vae="pixels")


def test_a_head_as_wide_as_the_body_needs_its_preset(tmp_path):
    torch.save(random_ditdh(hidden_size=256, num_heads=4).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(UserError, match="cannot tell where the DDT head starts"):
        load_model(tmp_path / "wide.pt", vae="pixels")


def test_ddpm_cannot_train_or_sample_a_ditdh(tmp_path):
    with pytest.raises(UserError, match="--objective rae"):
        build_objective("ddpm").check_network(config_from_name("DiTDH-T"))
    torch.save(random_ditdh().state_dict(), tmp_path / "m.pt")
    with pytest.raises(UserError, match="not the ddpm objective's"):
        load_model(tmp_path / "m.pt", vae="pixels", objective="ddpm")


# ------------------------------------------------------------------------------------------------
# fastdit sample / sample-ddp on RAE's checkpoints, and AutoGuidance
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def rae_files(tmp_path):
    """A DiT^DH in RAE's plain layout (a model), a weaker one (its guide), and models that do not fit."""
    files = {}
    for name, model in (("main", random_ditdh(0)), ("classes", random_ditdh(2, num_classes=12)),
                        ("gray", random_ditdh(3, in_channels=1))):
        files[name] = tmp_path / f"{name}.pt"
        torch.save(model.state_dict(), files[name])
    # The guide: a shallower body (a size of no preset, so it records its config, as a fastdit export does).
    weak = random_ditdh(1, depth=2)
    files["guide"] = export_weights(weak, ModelInfo(config=weak.config, latent=PIXELS, objective=build_objective("rae")),
                                    tmp_path / "guide.safetensors")
    flow = build_model("DiT-T/2", input_size=8, in_channels=3, num_classes=10)
    info = ModelInfo(config=flow.config, latent=PIXELS, objective=build_objective("flow"))
    files["flow"] = export_weights(flow, info, tmp_path / "flow.safetensors")
    return files


def sample(out, *args):
    return run_cli("sample", "--vae", "pixels", "--class-labels", 1, 2, "--num-sampling-steps", 4, "--no-progress",
                   "--no-upscale", "--device", "cpu", "--out", out, *args)


def test_sample_takes_raes_checkpoint_with_its_recipe(tmp_path, rae_files, capsys):
    out = tmp_path / "a.png"
    assert sample(out, "--ckpt", rae_files["main"]) == 0
    line = capsys.readouterr().out
    assert "settings from the checkpoint's recipe" in line and "sampler euler" in line and "cfg_scale 1" in line
    record = json.loads(Image.open(out).text["fastdit-recipe"])
    assert record["values"]["time_shift"] == math.sqrt(3 * 8 * 8 / 4096) and record["values"]["guidance_model"] is None


@pytest.mark.parametrize("grid, space, image_size", [(16, "rae:dinov2-b-reg", 256), (32, "rae:dinov2-b-reg-512", 512)])
def test_raes_release_layout_reads_as_in_raes_latent_space_of_its_grid(tmp_path, grid, space, image_size):
    """RAE's files record no latent space: 768 channels on a 16x16 grid are RAE's DINOv2-B space at
    256 px, 32x32 its 512-px space; the image size is then checked against that space's 16 px per token."""
    path = tmp_path / "release.pt"
    torch.save(random_ditdh(0, input_size=grid, in_channels=768).state_dict(), path)
    _, info = load_model(path)
    assert (info.latent.kind, info.latent.vae, info.image_size) == ("rae", space, image_size)
    with pytest.raises(UserError, match=f"use --image-size {image_size}"):
        load_model(path, image_size=image_size // 2)
    _, other = load_model(tmp_path / "release.pt", vae="mse")  # told otherwise, it is what it is told
    assert other.latent.kind == "vae"


def test_autoguidance_from_the_command_line(tmp_path, rae_files, capsys):
    plain, guided, again = tmp_path / "plain.png", tmp_path / "ag.png", tmp_path / "ag2.png"
    assert sample(plain, "--ckpt", rae_files["main"], "--cfg-scale", 1.5) == 0  # classifier-free
    assert sample(guided, "--ckpt", rae_files["main"], "--guidance-model", rae_files["guide"], "--cfg-scale", 1.5) == 0
    assert sample(again, "--ckpt", rae_files["main"], "--guidance-model", rae_files["guide"], "--cfg-scale", 1.5) == 0
    capsys.readouterr()
    a, b = np.asarray(Image.open(guided)), np.asarray(Image.open(again))
    assert np.array_equal(a, b) and not np.array_equal(a, np.asarray(Image.open(plain)))
    record = json.loads(Image.open(guided).text["fastdit-recipe"])
    assert record["values"]["guidance_model"] == str(rae_files["guide"]) and record["origin"]["guidance_model"] == \
        "--guidance-model"


@pytest.mark.parametrize("guide, message", [
    ("classes", "it has 12 classes, the model 10"),
    ("gray", "its inputs are 1x8x8, the model's 3x8x8"),
    ("flow", "it is a flow (linear path, velocity) model, the model a rae (linear path, velocity) one"),
])
def test_a_guidance_model_that_does_not_fit_is_one_line(tmp_path, rae_files, capsys, guide, message):
    assert sample(tmp_path / "x.png", "--ckpt", rae_files["main"], "--guidance-model", rae_files[guide],
                  "--cfg-scale", 1.5) == 2
    err = capsys.readouterr().err
    assert message in err and "AutoGuidance needs a weaker model of the same task" in err
    assert err.count("\n") == 1 and not (tmp_path / "x.png").exists()


def test_autoguidance_needs_a_scale_and_is_refused_by_self_guided_models(rae_files, capsys, tmp_path):
    assert sample(tmp_path / "x.png", "--ckpt", rae_files["main"], "--guidance-model", rae_files["guide"]) == 2
    assert "a guidance model guides at a scale above 1, but the scale is 1" in capsys.readouterr().err
    with pytest.raises(UserError, match="guides itself"):  # improved MeanFlow: its scale is an input
        SamplingOptions(sampler="meanflow", num_steps=1, cfg_scale=2.0, guidance_model="g.pt").validate(
            build_objective("meanflow", meanflow_guidance_input=True))


def test_a_guidance_model_that_fits_loads_in_eval_mode(rae_files):
    _, info = load_model(rae_files["main"], vae="pixels")
    guide = load_guidance_model(rae_files["guide"], info, vae="pixels")
    assert not guide.training and guide.config.depth == 2


def test_sample_ddp_with_autoguidance_records_it(tmp_path, rae_files):
    out = tmp_path / "s.npz"
    args = ["sample-ddp", "--ckpt", rae_files["main"], "--vae", "pixels", "--guidance-model", rae_files["guide"],
            "--cfg-scale", 1.42, "--num-fid-samples", 4, "--batch-size", 2, "--chunk-size", 2,
            "--num-sampling-steps", 3, "--no-progress", "--device", "cpu", "--out", out]
    assert run_cli(*args) == 0
    with np.load(out) as data:
        assert data["arr_0"].shape == (4, 8, 8, 3)
    settings = json.loads(out.with_suffix(".json").read_text())
    assert str(rae_files["guide"]) in json.dumps(settings)


def test_the_rae_presets_sample_raes_releases_with_their_guides():
    from fastdit.hub import OFFICIAL_CHECKPOINTS, official_url
    from fastdit.loading import official_checkpoint_name
    from fastdit.sampling.presets import PRESETS

    for name, fid in (("rae-ditdh-xl-256", 1.51), ("rae-ditdh-xl-256-ag", 1.13), ("rae-ditdh-xl-512-ag", 1.13)):
        preset = PRESETS[name]
        assert preset.published == {"fid": fid} and preset.objective == "rae"
        recipe = preset.recipe
        official_checkpoint_name(recipe["model"], recipe["image_size"])
        tokens = recipe["image_size"] // 16  # DINOv2 patch tokens of RAE's latents: 16 per side at 256 px
        assert recipe["time_shift"] == build_objective("rae").time_shift((768, tokens, tokens))
        assert (recipe["sampler"], recipe["num_steps"], recipe["label_sampling"]) == ("euler", 50, "equal")
        if recipe["guidance_model"] is not None:
            assert OFFICIAL_CHECKPOINTS[recipe["guidance_model"]] == ("DiTDH-S", recipe["image_size"])
    assert (PRESETS["rae-ditdh-xl-256-ag"].recipe["cfg_scale"], PRESETS["rae-ditdh-xl-512-ag"].recipe["cfg_scale"]) == \
        (1.42, 1.5)
    assert official_url("DiTDH-S-256x256.pt") == ("https://huggingface.co/nyu-visionx/RAE-collections/resolve/main/"
                                                  "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-S_ep14/stage2_model.pt")


def test_an_official_rae_name_downloads_into_its_own_cache(tmp_path, monkeypatch, file_server):
    """The release is XL (3.4 GB): the same path with a tiny network registered under its name."""
    import io

    from fastdit import hub

    buffer = io.BytesIO()
    torch.save(random_ditdh(input_size=16, in_channels=768, num_classes=1000).state_dict(), buffer)
    file_server.files["/DiTs/x.pt"] = buffer.getvalue()
    monkeypatch.setattr(hub, "RAE_COLLECTIONS_URL", f"http://127.0.0.1:{file_server.server_address[1]}/{{path}}")
    monkeypatch.setitem(hub.RAE_RELEASE_PATHS, "DiTDH-XL-256x256.pt", "DiTs/x.pt")
    monkeypatch.setitem(hub.OFFICIAL_CHECKPOINTS, "DiTDH-XL-256x256.pt", ("DiTDH-T", 256))
    model, info = load_model("DiTDH-XL-256x256.pt")
    assert (hub.cache_dir() / "rae" / "DiTDH-XL-256x256.pt").read_bytes() == buffer.getvalue()
    assert isinstance(model, DiTDH) and info.objective.name == "rae" and info.config.num_classes == 1000
    assert info.sampling["time_shift"] == math.sqrt(768 * 16 * 16 / 4096)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

DIGITS = ["--data-path", "digits", "--model", "DiTDH-T", "--objective", "rae", "--time-shift-base", "16",
          "--image-size", "8", "--num-classes", "10", "--depth", "2", "--hidden-size", "64", "--num-heads", "2",
          "--global-batch-size", "8", "--lr", "1e-3", "--num-workers", "0", "--no-progress", "--no-tensorboard"]


def test_a_training_run_exports_what_raes_code_loads(tmp_path):
    from fastdit.cli import main
    from safetensors.torch import load_file

    assert main(["train", *DIGITS, "--max-steps", "2", "--ckpt-every", "2", "--results-dir", str(tmp_path),
                 "--run-name", "run"]) == 0
    export = tmp_path / "run" / "checkpoints" / "0000002-ema.safetensors"
    weights = load_file(export)
    # RAE's `DiTwDDTHead` of the same config, built by its code, has exactly these keys and shapes: its
    # load_state_dict(strict=True) takes the export as it is.
    assert {key: list(value.shape) for key, value in weights.items()} == LAYOUTS["digits"]["keys"]
    _, info = load_model(export)
    assert info.objective.name == "rae" and info.sampling["time_shift"] == math.sqrt(1 * 8 * 8 / 16)
    config = info.config  # DiTDH-T's head after the body the flags chose, and the preset's (RAE's) outputs
    assert (config.head_depth, config.head_hidden_size, config.head_num_heads, config.learn_sigma) == (2, 256, 4, False)
    out = tmp_path / "grid.png"
    assert run_cli("sample", "--ckpt", export, "--num-sampling-steps", 3, "--out", out, "--no-progress") == 0


@pytest.mark.parametrize("flags, message", [
    (["--objective", "ddpm", "--time-shift-base", "4096"], "not the ddpm objective's; train it with --objective rae"),
    (["--repa", "dinov2-vitb14", "--repa-depth", "3"], "--repa-depth 3 is not a block of DiTDH-T (blocks 1..2)"),
    (["--disperse", "0.5", "--disperse-depth", "4"], "--disperse-depth 4 is not a block of DiTDH-T (blocks 1..2)"),
    (["--route", "0.5", "--route-blocks", "1:4"], "is not a span of this model's 2 blocks"),
])
def test_methods_that_take_a_block_address_the_body(tmp_path, capsys, flags, message):
    from fastdit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", *DIGITS, "--max-steps", "1", "--results-dir", str(tmp_path), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_regional_compile_trains_a_ditdh_the_same(tmp_path):
    from fastdit.distributed import DistInfo
    from fastdit.objectives import TrainingNetwork
    from fastdit.train.setup import prepare_model

    objective = build_objective("rae", time_shift_base=16)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    draws = {"sigma": torch.tensor([0.1, 0.4, 0.7, 0.95]), "noise": torch.randn(4, 1, 8, 8)}

    def loss_and_grads(compiled: bool):
        torch.manual_seed(0)
        model = build_model("DiTDH-T", depth=2, hidden_size=64, num_heads=2, input_size=8, in_channels=1,
                            num_classes=10)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        runnable = prepare_model(model, dist=cpu, gradient_checkpointing="blocks", compile_model=compiled,
                                 compile_backend="aot_eager")
        loss = objective.losses(TrainingNetwork.of(runnable), x, draws, {"y": y})["loss"].mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    (eager, eager_grads), (compiled, compiled_grads) = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_training_of_a_ditdh_is_finite_and_close_to_fp32(tmp_path):
    from fastdit.train.config import TrainConfig
    from fastdit.train.loop import train

    fields = dict(data_path="digits", model="DiTDH-T", objective="rae", time_shift_base=16, image_size=8, num_classes=10,
                  depth=2, hidden_size=64, num_heads=2, global_batch_size=8, lr=1e-3, num_workers=0, progress=False,
                  tensorboard=False, max_steps=2, ckpt_every=2)
    losses = {}
    for precision in ("fp32", "bf16"):
        run = train(TrainConfig.create(**fields, precision=precision, results_dir=str(tmp_path / precision)))
        losses[precision] = [json.loads(line)["loss"] for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    # bf16 rounds each matmul's inputs to 8 bits (2^-8 relative): over two blocks and a head the loss moves
    # by a few percent at most; a broken cast (fp16 overflow, a dropped autocast) would not be close.
    assert all(math.isfinite(v) for v in losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_fsdp2_trains_a_ditdh_like_ddp(tmp_path):
    """Two processes over gloo: FSDP2 shards the body's and the head's blocks as units (the embedders, the
    frozen tables and the final layer at the root) and trains what DDP trains, within the bound of
    tests/test_fsdp.py (the two differ only in how the gradients are summed); its export is RAE's layout."""
    from test_fsdp import losses, torchrun_command, torchrun_env
    from test_train import final_state
    from test_train_distributed import assert_same_after_adam
    import subprocess

    ditdh = ["--model", "DiTDH-T", "--objective", "rae", "--time-shift-base", "16", "--max-steps", "4",
             "--ckpt-every", "4"]
    for name, sharding in (("ddp", []), ("fsdp", ["--fsdp", "--sample-every", "4", "--sample-steps", "2"])):
        result = subprocess.run(torchrun_command(*ditdh, "--results-dir", str(tmp_path / name), *sharding),
                                env=torchrun_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    ddp, fsdp = tmp_path / "ddp" / "run", tmp_path / "fsdp" / "run"
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-5) and len(losses(fsdp)) == 4
    ddp_state, fsdp_state = final_state(ddp), final_state(fsdp)
    assert fsdp_state["model"].keys() == ddp_state["model"].keys()
    for key in ddp_state["model"]:
        assert_same_after_adam(fsdp_state["model"][key], ddp_state["model"][key], key, steps=4)
    model, info = load_model(fsdp / "checkpoints" / "0000004-ema.safetensors")
    assert isinstance(model, DiTDH) and info.objective.name == "rae"
    assert (fsdp / "samples" / "0000004.png").is_file()  # rank 0 sampled from the gathered EMA, a DiTDH


def test_a_preset_with_autoguidance_can_be_turned_back_to_classifier_free():
    from fastdit.cli import build_parser
    from fastdit.cli.common import RecipePlan

    def plan(*flags):
        return RecipePlan(build_parser().parse_args(["sample-ddp", "--ckpt", "x.pt", "--preset", "rae-ditdh-xl-256-ag",
                                                     *flags]))

    assert plan().options.guidance_model == "DiTDH-S-256x256.pt" and plan().options.cfg_scale == 1.42
    off = plan("--no-guidance-model")
    assert off.options.guidance_model is None and off.options.cfg_scale == 1.42  # classifier-free at the same scale
    assert off.resolved.overridden["guidance_model"] == ("--guidance-model", "DiTDH-S-256x256.pt", None)


def test_the_app_samples_with_a_guidance_model(tmp_path, rae_files):
    from fastdit.app.models import ModelSource
    from fastdit.app.request import ModelCache, SampleRequest, generate_grid

    main = random_ditdh(0)
    main_file = export_weights(main, ModelInfo(config=main.config, latent=PIXELS, objective=build_objective("rae")),
                               tmp_path / "main.safetensors")
    cache = ModelCache()
    request = SampleRequest(source=ModelSource(str(main_file)), labels=(1, 2), sampler="euler", num_steps=3,
                            cfg_scale=1.5, guidance_model=str(rae_files["guide"]), device="cpu")
    command = generate_grid(request, cache, tmp_path / "page.png", progress=False)
    assert f"--guidance-model {rae_files['guide']}" in command and (tmp_path / "page.png").is_file()
    refused = SampleRequest(source=ModelSource(str(main_file)), labels=(1,), sampler="euler", num_steps=3,
                            cfg_scale=1.5, guidance_model=str(rae_files["classes"]), device="cpu")
    # A plain state dict records no latent space: the page (which has no VAE field) takes it for SD-VAE latents.
    with pytest.raises(UserError, match="it works on the latents of 'mse' .*, the model on pixels"):
        generate_grid(refused, cache, tmp_path / "no.png", progress=False)
