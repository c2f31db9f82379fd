"""Recipe files (`fastdit.sampling.recipe`): written and read back, refused when malformed, and taken by
`fastdit sample` and `sample-ddp --recipe FILE` as the source layer, each flag still overriding one field."""

import json

import pytest
import torch
from PIL import Image

from cli_runner import run_cli
from fastdit.checkpoint import export_weights
from fastdit.errors import UserError
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.models import build_model
from fastdit.sampling.recipe import read_recipe_file, write_recipe_file

VALUES = {"sampler": "ddim", "num_steps": 3, "cfg_scale": 2.5, "guided_channels": None, "guidance_interval": (100.0, 900.0),
          "time_shift": 1.0, "label_sampling": "random", "num_samples": 6}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=1, num_classes=4)
    return export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None)),
                          tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_a_recipe_file_reads_back_what_was_written(tmp_path):
    weights = tmp_path / "weights" / "w.safetensors"
    path = write_recipe_file(tmp_path / "recipe.json", "best", VALUES, ckpt=weights, job={"seed": 7, "batch_size": 4},
                             record={"metric": "fid"})
    assert json.loads(path.read_text())["ckpt"] == "weights/w.safetensors"  # inside its folder: relative, the folder moves
    recipe = read_recipe_file(path)
    assert recipe.values == VALUES and recipe.name == "best" and recipe.job == {"seed": 7, "batch_size": 4}
    assert recipe.ckpt == tmp_path / "weights" / "w.safetensors" and recipe.record == {"metric": "fid"}
    assert recipe.as_source().what == "recipe best"
    outside = write_recipe_file(tmp_path / "sub" / "r.json", "x", {}, ckpt=tmp_path / "w.safetensors")
    assert json.loads(outside.read_text())["ckpt"] == str((tmp_path / "w.safetensors").resolve())


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read recipe file"),
    (json.dumps({"values": {}}), "is not a fastdit recipe file"),
    (json.dumps({"format": "fastdit.recipe", "values": {"cfg": 2}}), "sets unknown field(s) cfg"),
    (json.dumps({"format": "fastdit.recipe", "values": {}, "seed": -1}), "seed must be a non-negative integer"),
    (json.dumps({"format": "fastdit.recipe", "values": {"label_sampling": "some"}}), "unknown label sampling"),
    (json.dumps({"format": "fastdit.recipe", "version": 9, "values": {}}), "newer than this fastdit reads"),
])
def test_a_malformed_recipe_file_is_refused(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_recipe_file(path)


def test_sample_takes_the_recipe_its_weights_and_a_flag_over_it(tiny_ckpt, tmp_path, capsys):
    recipe = write_recipe_file(tmp_path / "recipe.json", "mine", VALUES, ckpt=tiny_ckpt)
    out = tmp_path / "grid.png"
    assert run_cli("sample", "--recipe", recipe, "--cfg-scale", "3", "--class-labels", "0", "1", "--out", out,
                   "--no-progress", "--device", "cpu") == 0
    printed = capsys.readouterr().out
    assert "settings from recipe mine" in printed and "--cfg-scale overrode cfg_scale (2.5 -> 3)" in printed
    record = json.loads(Image.open(out).text["fastdit-recipe"])
    assert record["source"] == "recipe mine" and record["values"]["sampler"] == "ddim"
    assert record["values"]["guidance_interval"] == [100.0, 900.0] and record["values"]["cfg_scale"] == 3.0


def test_sample_ddp_takes_the_recipes_count_seed_and_batch(tiny_ckpt, tmp_path):
    import numpy as np

    recipe = write_recipe_file(tmp_path / "recipe.json", "mine", VALUES, ckpt=tiny_ckpt,
                               job={"seed": 5, "batch_size": 2, "chunk_size": 4})
    out, direct = tmp_path / "a.npz", tmp_path / "b.npz"
    assert run_cli("sample-ddp", "--recipe", recipe, "--out", out, "--no-progress", "--device", "cpu") == 0
    flags = ["--ckpt", tiny_ckpt, "--sampler", "ddim", "--num-sampling-steps", "3", "--cfg-scale", "2.5",
             "--guidance-interval", "100", "900", "--num-fid-samples", "6", "--seed", "5", "--batch-size", "2",
             "--chunk-size", "4"]
    assert run_cli("sample-ddp", *flags, "--out", direct, "--no-progress", "--device", "cpu") == 0
    with np.load(out) as a, np.load(direct) as b:  # the same images and labels (the records name their sources)
        assert a["arr_0"].shape == (6, 8, 8, 3)
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == 5


def test_preset_and_recipe_exclude_each_other_and_a_bad_value_names_the_file(tiny_ckpt, tmp_path, capsys):
    recipe = write_recipe_file(tmp_path / "recipe.json", "mine", {**VALUES, "sampler": "meanflow"}, ckpt=tiny_ckpt)
    assert run_cli("sample-ddp", "--recipe", recipe, "--preset", "dit-xl2-256", "--out", tmp_path / "x.npz") == 2
    assert "--preset and --recipe" in capsys.readouterr().err
    assert run_cli("sample-ddp", "--recipe", recipe, "--out", tmp_path / "x.npz", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"recipe file {str(recipe)!r}" in err and "meanflow" in err
