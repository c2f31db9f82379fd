"""Sampling recipes: presets resolve into valid runs, flags override one field and are reported, equal
labels, the recipe a checkpoint records, and the upscaled grid of `fastdit sample`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.checkpoint import export_weights, load_model
from fastdit.errors import UserError
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.models import build_model
from fastdit.objectives import build_objective, objective_names
from fastdit.sample_ddp.npz import read_settings
from fastdit.sampling import SamplingOptions, generate
from fastdit.sampling.indexed import labels_for
from fastdit.sampling.presets import PRESETS
from fastdit.sampling.recipe import RECIPE_FIELDS, RecipeSource, checkpoint_source, resolve, training_recipe
from fastdit.latents import PixelSpace
from cli_runner import run_cli

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A pixel-space DDPM model with no recorded recipe: a file from before recipes."""
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=1, num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None)), path)
    return path, model


@pytest.fixture(scope="module")
def recipe_export(tiny_export, tmp_path_factory):
    """The same weights, with a recorded recipe: DDIM, 3 steps, cfg 2."""
    _, model = tiny_export
    path = tmp_path_factory.mktemp("ckpt") / "recipe.safetensors"
    info = ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None),
                     sampling={"sampler": "ddim", "num_steps": 3, "cfg_scale": 2.0})
    export_weights(model, info, path)
    return path


# ------------------------------------------------------------------------------------------------
# presets and resolution
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves_into_a_valid_sampling_run(name):
    preset = PRESETS[name]
    assert set(preset.recipe) <= set(RECIPE_FIELDS) and preset.source and preset.objective in objective_names()
    assert set(preset.recipe) >= {"sampler", "num_steps", "cfg_scale", "guided_channels", "guidance_interval",
                                  "time_shift", "label_sampling", "num_samples"}
    resolved = resolve({}, preset.as_source(), {})
    options = resolved.options()
    options.validate(build_objective(preset.objective))  # the sampler exists for the objective, in range
    assert options.sampler == preset.recipe["sampler"] and resolved.preset == name
    # FID-50K with labels as the paper's sample_ddp.py draws them: at random (DiT, SiT), 50 per class (RAE).
    assert resolved["num_samples"] == 50_000 and resolved["label_sampling"] == ("equal" if preset.objective == "rae" else "random")
    if preset.recipe.get("model"):  # the official weights it names exist
        from fastdit.loading import official_checkpoint_name

        official_checkpoint_name(preset.recipe["model"], preset.recipe["image_size"])


def test_published_figures_and_recipes_match_the_papers():
    assert PRESETS["dit-xl2-256"].published == {"fid": 2.27} and PRESETS["dit-xl2-512"].published == {"fid": 3.04}
    assert PRESETS["dit-xl2-256"].recipe["guided_channels"] == 3 and PRESETS["dit-xl2-256"].recipe["cfg_scale"] == 1.5
    assert PRESETS["sit-xl2-sde"].published == {"fid": 2.06}
    repa = PRESETS["repa-sde-250"].recipe
    # REPA guides where its time (1 = noise) is in [0, 0.7]; fastdit's flow time is 1 minus it.
    assert (repa["cfg_scale"], repa["guidance_interval"]) == (1.8, (0.3, 1.0))


def test_flags_override_one_field_each_and_the_line_says_which():
    source = RecipeSource("preset x", {"sampler": "ddpm", "num_steps": 250, "cfg_scale": 1.5, "guided_channels": 3},
                          preset="x")
    resolved = resolve({"cfg_scale": 4.0}, source, {"cfg_scale": 2.0, "time_shift": 1.0})
    assert resolved["cfg_scale"] == 2.0 and resolved["num_steps"] == 250 and resolved["guided_channels"] == 3
    assert resolved.origin["cfg_scale"] == "--cfg-scale" and resolved.origin["num_steps"] == "preset x"
    assert resolved.origin["label_sampling"] == "default"
    line = resolved.describe()
    assert line.startswith("settings from preset x; --cfg-scale overrode cfg_scale (1.5 -> 2)")
    assert "flags: --time-shift 1" in line
    record = resolved.to_dict()
    assert record["preset"] == "x" and record["overridden"] == {"cfg_scale": {"flag": "--cfg-scale", "was": 1.5, "now": 2.0}}
    # A flag that repeats the source's value overrides nothing.
    assert resolve({}, source, {"num_steps": 250}).overridden == {}
    # "None" on purpose (every channel guided) is a value, not "not given".
    assert resolve({}, source, {"guided_channels": None})["guided_channels"] is None


def test_training_recipe_fixes_meanflow_and_unconditional_models():
    assert training_recipe(build_objective("meanflow", meanflow_omega=3.0), conditional=True) == \
        {"sampler": "meanflow", "num_steps": 1, "cfg_scale": 1.0}
    assert training_recipe(build_objective("ddpm"), conditional=False) == {"sampler": "ddpm", "num_steps": 250, "cfg_scale": 1.0}
    # A guidable model leaves the scale to the command (4 for a picture, 1.5 for FID, or the flag).
    assert training_recipe(build_objective("flow"), conditional=True) == {"sampler": "sde-euler", "num_steps": 250}
    assert checkpoint_source(None) is None and checkpoint_source({}) is None


# ------------------------------------------------------------------------------------------------
# the commands
# ------------------------------------------------------------------------------------------------


def test_sample_uses_the_checkpoints_recipe_and_says_so(recipe_export, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert run_cli("sample", "--ckpt", recipe_export, "--class-labels", 0, 1, "--out", out, "--no-progress") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("settings from the checkpoint's recipe") and "sampler ddim, num_steps 3, cfg_scale 2," in lines[0]
    assert "ddim 3 steps, cfg 2.0" in lines[-1]
    record = json.loads(Image.open(out).text["fastdit-recipe"])
    assert record["source"] == "the checkpoint's recipe" and record["values"]["num_steps"] == 3
    # One flag overrides one field; the rest stay the recipe's.
    assert run_cli("sample", "--ckpt", recipe_export, "--class-labels", 0, "--num-sampling-steps", 4, "--out", out,
                   "--no-progress") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "--num-sampling-steps overrode num_steps (3 -> 4)" in lines[0] and "ddim 4 steps, cfg 2.0" in lines[-1]


def test_old_checkpoints_without_a_recipe_keep_todays_defaults(tiny_export, tmp_path, capsys):
    path, _ = tiny_export
    assert load_model(path)[1].sampling is None
    out = tmp_path / "grid.png"
    assert run_cli("sample", "--ckpt", path, "--class-labels", 0, "--num-sampling-steps", 2, "--out", out, "--no-progress") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("settings: the defaults") and "ddpm 2 steps, cfg 4.0" in lines[-1]


def test_generate_without_options_samples_by_the_recorded_recipe(recipe_export):
    model, info = load_model(recipe_export)
    by_recipe = generate(model, PixelSpace(3), [0, 1], info=info, seed=3)
    explicit = generate(model, PixelSpace(3), [0, 1], options=SamplingOptions(sampler="ddim", num_steps=3, cfg_scale=2.0),
                        objective=info.objective, seed=3)
    assert np.array_equal(by_recipe, explicit)  # the same call, the same arithmetic
    other = generate(model, PixelSpace(3), [0, 1], options=SamplingOptions(num_steps=3), objective=info.objective, seed=3)
    assert not np.array_equal(by_recipe, other)


def test_small_grids_are_upscaled_nearest_unless_told_not_to(tiny_export, tmp_path):
    path, _ = tiny_export
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    common = ["sample", "--ckpt", path, "--class-labels", 0, 1, "--num-sampling-steps", 2, "--no-progress"]
    assert run_cli(*common, "--out", big) == 0 and run_cli(*common, "--out", small, "--no-upscale") == 0
    a, b = np.asarray(Image.open(big)), np.asarray(Image.open(small))
    assert b.shape == (12, 22, 3) and a.shape == (12 * 8, 22 * 8, 3)  # 8x8 images shown 64 px wide
    assert np.array_equal(a, b.repeat(8, axis=0).repeat(8, axis=1))  # nearest: blocks, nothing smoothed


def test_sample_ddp_with_a_preset_records_it_and_evaluate_prints_the_published_figure(tiny_export, tmp_path, capsys, monkeypatch):
    path, _ = tiny_export
    out = tmp_path / "s.npz"
    # dit-xl2-256 on a tiny pixel model: its sampler, cfg and 3 guided channels fit; count and steps overridden.
    assert run_cli("sample-ddp", "--preset", "dit-xl2-256", "--ckpt", path, "--num-fid-samples", 4,
                   "--num-sampling-steps", 2, "--out", out, "--device", "cpu", "--no-progress") == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("settings from preset dit-xl2-256; --num-sampling-steps overrode num_steps (250 -> 2); "
                            "--num-fid-samples overrode num_samples (50000 -> 4)")
    settings = read_settings(out)
    assert settings["recipe"]["preset"] == "dit-xl2-256" and settings["sampling"]["guided_channels"] == 3
    assert settings["sampling"]["cfg_scale"] == 1.5 and settings["labels"] == "uniform"
    assert json.loads(out.with_suffix(".json").read_text())["recipe"]["values"]["num_samples"] == 4

    from fastdit.cli import evaluate

    line = evaluate.published_line(out, {"fid": 123.4})
    assert line.startswith("preset dit-xl2-256: FID 123.40 measured, 2.27 published (DiT paper")
    assert "this run changed num_samples, num_steps" in line
    plain = tmp_path / "plain.npz"
    np.savez(plain, np.zeros((2, 8, 8, 3), np.uint8))
    assert evaluate.published_line(plain, {"fid": 1.0}) is None


def test_a_preset_for_another_objective_is_refused_in_one_line(tiny_export, tmp_path, capsys):
    path, _ = tiny_export
    status = run_cli("sample-ddp", "--preset", "sit-xl2-sde", "--ckpt", path, "--num-fid-samples", 4,
                     "--out", tmp_path / "s.npz", "--device", "cpu", "--no-progress")
    assert status == 2
    assert "preset sit-xl2-sde (for flow models): sampler 'sde-euler' does not fit this ddpm model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# equal labels
# ------------------------------------------------------------------------------------------------


def test_equal_labels_give_every_class_n_over_k_in_an_order_fixed_by_the_seed():
    labels = labels_for(range(120), seed=5, num_classes=12, label_sampling="equal", num_samples=120)
    assert np.bincount(labels, minlength=12).tolist() == [10] * 12
    pieces = np.concatenate([labels_for(range(a, min(a + 7, 120)), seed=5, num_classes=12, label_sampling="equal",
                                        num_samples=120) for a in range(0, 120, 7)])
    assert np.array_equal(labels, pieces)  # a function of (seed, N, i): not of the batches
    other = labels_for(range(120), seed=6, num_classes=12, label_sampling="equal", num_samples=120)
    assert not np.array_equal(labels, other) and np.bincount(other).tolist() == [10] * 12
    assert not np.array_equal(labels, np.arange(120) % 12)  # shuffled, not cycled
    with pytest.raises(UserError, match="121 images are not a multiple of 12 classes; use 120 or 132 images"):
        labels_for(range(3), seed=0, num_classes=12, label_sampling="equal", num_samples=121)


def test_sample_ddp_equal_labels_one_and_two_processes_write_the_same_file(tiny_export, tmp_path, capsys):
    path, _ = tiny_export
    run = ["--ckpt", str(path), "--num-fid-samples", "8", "--chunk-size", "3", "--batch-size", "2",
           "--num-sampling-steps", "2", "--label-sampling", "equal", "--seed", "3", "--device", "cpu", "--no-progress"]
    one = tmp_path / "one.npz"
    assert run_cli("sample-ddp", *run, "--out", one) == 0
    labels = np.load(one)["arr_1"]
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES
    assert read_settings(one)["labels"] == "equal"
    assert run_cli("sample-ddp", *run[:3], "9", *run[4:], "--out", tmp_path / "bad.npz") == 2
    assert "9 images are not a multiple of 4 classes; use 8 or 12 images" in capsys.readouterr().err

    two = tmp_path / "two.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, "-m", "fastdit", "sample-ddp", *run, "--out", str(two)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("settings: the defaults") == 1  # the first line, from the main process only
    assert two.read_bytes() == one.read_bytes()


# ------------------------------------------------------------------------------------------------
# training records its recipe
# ------------------------------------------------------------------------------------------------


def test_training_records_its_recipe_in_checkpoint_and_export(tmp_path, capsys):
    from fastdit.train.config import TrainConfig
    from fastdit.train.loop import train
    from fastdit.train.state import load_training_state

    config = TrainConfig.create(model="DiT-T/2", depth=1, image_size=8, num_classes=10, data_path="digits",
                                vae="pixels", objective="flow", global_batch_size=8, max_steps=1, num_workers=0,
                                device="cpu", results_dir=str(tmp_path), run_name="r", ckpt_every=1,
                                tensorboard=False, progress=False, recipe_sampler="heun", recipe_steps=5,
                                recipe_cfg_scale=2.5)
    result = train(config)
    expected = {"sampler": "heun", "num_steps": 5, "cfg_scale": 2.5}
    assert load_model(result.export)[1].sampling == expected
    assert load_training_state(result.checkpoint)["model_info"]["sampling"] == expected
    out = tmp_path / "grid.png"
    capsys.readouterr()
    assert run_cli("sample", "--ckpt", result.export, "--class-labels", 0, "--out", out, "--no-progress") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("settings from the checkpoint's recipe") and "heun 5 steps, cfg 2.5" in lines[-1]
    with pytest.raises(UserError, match="--recipe-sampler"):
        TrainConfig.create(data_path="digits", recipe_sampler="ddpm", objective="flow").validate()


def test_the_demo_records_the_sampling_it_was_judged_with():
    from fastdit.demo.run import DemoConfig, train_config

    assert train_config(DemoConfig()).sampling_recipe() == {"sampler": "heun", "num_steps": 9, "cfg_scale": 3.0}
    meanflow = train_config(DemoConfig(objective="meanflow")).sampling_recipe()
    assert meanflow == {"sampler": "meanflow", "num_steps": 1, "cfg_scale": 1.0}


def test_presets_command_lists_every_preset_with_its_source(capsys):
    assert run_cli("presets") == 0
    text = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert name in text and preset.source in text
    assert run_cli("presets", "repa-sde-250") == 0
    assert "guidance_interval  [0.3, 1]" in capsys.readouterr().out
    assert run_cli("presets", "nope") == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
