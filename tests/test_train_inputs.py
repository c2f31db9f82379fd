"""Inputs that change under a resumed run, and data folders that loop: issue #18 item 5, classes 5 and 6.

A run records its class list and a digest of its file list (`fastdit.train.data_record`); a resumed
run refuses a changed class list and warns about a changed file list. Listing an image folder visits
every real folder once, so symbolic-link loops neither repeat images nor hang. Pixel stores made by
`extract --vae pixels` train like any other store.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_image_folder
from fastdit.checkpoint import load_model
from fastdit.cli import main
from fastdit.data import list_image_folder
from fastdit.errors import UserError
from fastdit.models import build_model
from fastdit.train.config import TrainConfig
from fastdit.train.data_record import DATA_RECORD
from fastdit.train.loop import train
from test_train import tiny_config


def pixel_run(tmp_path, images, **overrides):
    fields = dict(data_path=str(images), vae="pixels", image_size=8, num_classes=None, global_batch_size=4,
                  max_steps=2, ckpt_every=2)
    return tiny_config(tmp_path / "results", **{**fields, **overrides})


# ---------------------------------------------------------------------------------------------- records


def test_a_run_records_its_classes_and_file_digest(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    result = train(pixel_run(tmp_path, images))
    record = json.loads((result.run_dir / DATA_RECORD).read_text())
    assert record["class_names"] == ["cat", "dog"]
    assert record["num_items"] == 4
    assert len(record["files_digest"]) == 64  # sha256 hex


def test_resume_refuses_an_added_or_removed_class_naming_it(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    train(pixel_run(tmp_path, images))
    make_image_folder(images, classes=("bee",), per_class=2)  # sorts first: every label would shift
    shutil.rmtree(images / "dog")
    with pytest.raises(UserError, match=r"added 'bee'; removed 'dog'"):
        train(pixel_run(tmp_path, images, max_steps=4))


def test_resume_warns_about_a_changed_file_list_and_continues(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    train(pixel_run(tmp_path, images))
    shutil.copy(images / "cat" / "0.png", images / "cat" / "extra.png")
    capsys.readouterr()
    result = train(pixel_run(tmp_path, images, max_steps=4))
    assert result.step == 4
    out = capsys.readouterr().out
    assert "warning: the data's file list changed" in out and "4 -> 5 items" in out
    # The new list is recorded: the next resume has nothing to warn about.
    train(pixel_run(tmp_path, images, max_steps=6))
    assert "file list changed" not in capsys.readouterr().out


def test_same_data_resumes_without_a_warning(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    train(pixel_run(tmp_path, images))
    capsys.readouterr()
    assert train(pixel_run(tmp_path, images, max_steps=4)).step == 4
    assert "warning: the data" not in capsys.readouterr().out


def test_a_results_folder_inside_the_data_folder_is_not_a_class(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    config = tiny_config(images / "results", data_path=str(images), vae="pixels", image_size=8, num_classes=2,
                         global_batch_size=4, max_steps=2, ckpt_every=1, sample_every=1, sample_steps=2)
    first = train(config)  # writes PNG sample grids into the results folder
    assert list((first.run_dir / "samples").glob("*.png"))
    resumed = train(TrainConfig.create(**{**config.to_flat(), "max_steps": 3}))
    assert resumed.step == 3
    assert json.loads((resumed.run_dir / DATA_RECORD).read_text())["class_names"] == ["cat", "dog"]


# ---------------------------------------------------------------------------------------------- loops


def test_a_link_to_the_folder_itself_repeats_no_image(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=1)
    os.symlink(".", images / "cat" / "s")
    os.symlink(".", images / "s")  # at the root: would be a class holding every image
    index = list_image_folder(images)
    assert index.class_names == ["cat", "dog"]
    assert index.files == ["cat/0.png", "dog/0.png"]


def test_two_folders_linking_to_each_other_neither_hang_nor_repeat(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=1)
    os.symlink("../dog", images / "cat" / "to-dog")
    os.symlink("../cat", images / "dog" / "to-cat")
    # In a child process with a time limit: a listing that loops would hang this test run.
    code = ("from fastdit.data import list_image_folder; i = list_image_folder(%r); print(i.files, i.labels)"
            % str(images))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    # Each image once, under its own class: a class never walks into another class's folder.
    assert done.stdout.strip() == "['cat/0.png', 'dog/0.png'] [0, 1]"


def test_a_linked_class_folder_outside_the_root_still_counts(tmp_path):
    elsewhere = make_image_folder(tmp_path / "elsewhere", classes=("eel",), per_class=2)
    images = make_image_folder(tmp_path / "images", classes=("cat",), per_class=1)
    os.symlink(elsewhere / "eel", images / "eel")
    index = list_image_folder(images)
    assert index.class_names == ["cat", "eel"] and index.labels == [0, 1, 1]


# ---------------------------------------------------------------------------------------------- pixel stores


def test_a_pixel_store_trains_and_samples_end_to_end(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=3)
    store = tmp_path / "store"
    assert main(["extract", "--data-path", str(images), "--features-path", str(store), "--vae", "pixels",
                 "--image-size", "8", "--num-workers", "0", "--no-progress"]) == 0
    result = train(tiny_config(tmp_path / "results", data_path=None, features_path=str(store), image_size=8,
                               num_classes=2, global_batch_size=2, max_steps=2, ckpt_every=2))
    model, info = load_model(result.export)
    assert info.latent.kind == "pixels" and info.image_size == 8 and info.class_names == ["cat", "dog"]
    assert main(["sample", "--ckpt", str(result.export), "--num-sampling-steps", "2", "--class-labels", "0", "1",
                 "--cfg-scale", "1", "--out", str(tmp_path / "grid.png"), "--no-progress"]) == 0
    assert (tmp_path / "grid.png").is_file()


def test_a_pixel_store_named_with_vae_pixels_trains_and_another_vae_is_refused(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", classes=("cat",), per_class=2)
    store = tmp_path / "store"
    main(["extract", "--data-path", str(images), "--features-path", str(store), "--vae", "pixels",
          "--image-size", "12", "--num-workers", "0", "--no-progress"])
    common = dict(data_path=None, features_path=str(store), image_size=12, num_classes=1, global_batch_size=2,
                  max_steps=1, ckpt_every=1, depth=1)
    # 12 is no multiple of the VAE's 8: a pixel store needs none.
    assert train(tiny_config(tmp_path / "r1", vae="pixels", **common)).step == 1
    with pytest.raises(UserError, match="was made with VAE 'pixels'.*pass --vae pixels"):
        train(tiny_config(tmp_path / "r2", vae="ema", **common))


# ---------------------------------------------------------------------------------------------- your own data


def test_the_class_count_comes_from_the_data_and_the_printed_command_samples_its_classes(tmp_path, capsys):
    """A 3-class folder trained without --num-classes: the model has 3 classes (recorded in its export and
    config), and the command `fastdit train` prints samples those classes, not ImageNet's 207, 360, ..."""
    images = make_image_folder(tmp_path / "images", classes=("ant", "bee", "cow"), per_class=2)
    assert main(["train", "--data-path", str(images), "--vae", "pixels", "--image-size", "8", "--model", "DiT-T/2",
                 "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--global-batch-size", "6",
                 "--max-steps", "2", "--ckpt-every", "2", "--num-workers", "0", "--no-progress", "--no-tensorboard",
                 "--results-dir", str(tmp_path / "runs")]) == 0
    printed = capsys.readouterr().out.split("sample with: ")[-1].strip()
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "config.json").read_text())["model"]["num_classes"] == 3
    out = tmp_path / "grid.png"
    words = shlex.split(printed)
    assert main([*words[words.index("sample"):], "--out", str(out), "--num-sampling-steps", "2", "--no-progress"]) == 0
    labels = json.loads(Image.open(out).text["fastdit-recipe"])["labels"]
    assert labels == [0, 1, 2]


def test_a_class_count_that_is_not_the_datas_is_one_line(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("ant", "bee", "cow"), per_class=2)
    for given in (2, 1000):
        with pytest.raises(UserError, match=f"the data has 3 classes but --num-classes is {given}; leave "
                                            "--num-classes out"):
            train(pixel_run(tmp_path, images, num_classes=given))
    assert not (tmp_path / "results").exists()


def test_a_short_run_with_a_long_ema_says_so_and_the_warm_up_follows_the_model(tmp_path, capsys):
    from safetensors.torch import load_file

    train(tiny_config(tmp_path / "plain", max_steps=4, ckpt_every=4, ema_decay=0.9999))
    assert "warning: EMA 0.9999 after 4 steps still holds 100% of the initial weights" in capsys.readouterr().out
    warm = train(tiny_config(tmp_path / "warm", max_steps=4, ckpt_every=4, ema_decay=0.9999, ema_warmup=True))
    state = torch.load(warm.checkpoint, weights_only=True)
    # min(decay, (1 + t) / (10 + t)) for t = 0..3: the EMA keeps 0.1·(2/11)·(3/12)·(4/13) = 0.0014 of the
    # initial weights; without warm-up 0.9999^4 = 99.96%. A weight the model moved is far from its start.
    export = load_file(str(warm.export))
    start = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64,
                        num_heads=2).state_dict()
    key = "blocks.0.attn.qkv.weight"
    moved = (state["model"][key] - start[key]).abs().mean()
    assert (export[key] - start[key]).abs().mean() > 0.5 * moved


def test_fine_tuning_from_a_checkpoint_with_other_classes(tmp_path):
    """--init-from: weights from another run (5 classes) into a 3-class run: every weight copied but the label
    table's rows of classes 3 and 4 (gone) and the position table; the optimizer and the step start afresh."""
    five = make_image_folder(tmp_path / "five", classes=("a", "b", "c", "d", "e"), per_class=2)
    source = train(pixel_run(tmp_path / "source", five))
    three = make_image_folder(tmp_path / "three", classes=("x", "y", "z"), per_class=2)
    tuned = train(pixel_run(tmp_path / "tuned", three, init_from=str(source.export), max_steps=1, ckpt_every=1,
                            lr=1e-12))
    before, after = load_file(str(source.export)), torch.load(tuned.checkpoint, weights_only=True)
    assert after["position"]["step"] == 1 and all(v["step"] == 1 for v in after["optimizer"]["state"].values())
    table = after["model"]["y_embedder.embedding_table.weight"]
    assert table.shape[0] == 4  # 3 classes and the null class
    # lr 1e-12: one step moves nothing visible (Adam's first step is lr in size)
    old = before["y_embedder.embedding_table.weight"]
    assert torch.allclose(table[:3], old[:3], atol=1e-9) and torch.allclose(table[3], old[5], atol=1e-9)
    for key in ("blocks.0.attn.qkv.weight", "final_layer.linear.weight", "t_embedder.mlp.0.weight"):
        assert torch.allclose(after["model"][key], before[key], atol=1e-9), key


def test_fine_tuning_refuses_another_architecture_in_one_line(tmp_path):
    five = make_image_folder(tmp_path / "five", classes=("a", "b"), per_class=2)
    source = train(pixel_run(tmp_path / "source", five))
    with pytest.raises(UserError, match="--init-from .* is another architecture: hidden_size 64 .this run: 32."):
        train(pixel_run(tmp_path / "other", five, init_from=str(source.export), hidden_size=32))


def test_fine_tuning_from_an_official_name_takes_the_release_at_the_runs_size():
    from fastdit.train.init_from import source_of

    assert source_of("DiT-XL/2", 256) == "DiT-XL-2-256x256.pt" and source_of("DiT-XL/2", 512) == "DiT-XL-2-512x512.pt"
    assert source_of("SiT-XL/2", 256) == "SiT-XL-2-256x256.pt" and source_of("runs/x.safetensors", 64) == "runs/x.safetensors"
    with pytest.raises(UserError, match="--init-from SiT-XL/2 is released at 256 px, not 512"):
        source_of("SiT-XL/2", 512)
