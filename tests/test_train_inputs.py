"""Inputs that change under a resumed run, and data folders that loop: issue #18 item 5, classes 5 and 6.

A run records its class list and a digest of its file list (`fastdit.train.data_record`); a resumed
run refuses a changed class list and warns about a changed file list. Listing an image folder visits
every real folder once, so symbolic-link loops neither repeat images nor hang. Pixel stores made by
`extract --vae pixels` train like any other store.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import make_image_folder
from fastdit.checkpoint import load_model
from fastdit.cli import main
from fastdit.data import list_image_folder
from fastdit.errors import UserError
from fastdit.train.config import TrainConfig
from fastdit.train.data_record import DATA_RECORD
from fastdit.train.loop import train
from test_train import tiny_config


def pixel_run(tmp_path, images, **overrides):
    fields = dict(data_path=str(images), vae="pixels", image_size=8, num_classes=4, global_batch_size=4,
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
