"""Hostile inputs that gave tracebacks (issue #18 item 5, class 9): each is now one line, or handled.

Each test names the input; a UserError is what the CLI prints as one line with exit status 2.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_image_folder
from fastdit.checkpoint import TRAIN_FORMAT, export_weights, load_model
from fastdit.cli import main
from fastdit.data import LatentStore
from fastdit.devices import resolve_device
from fastdit.errors import UserError
from fastdit.evaluate.sources import FolderImages
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.models import build_model
from fastdit.seeding import MAX_SEED, derive_seed
from fastdit.train.loop import train
from test_train import final_state, tiny_config


def cli_error(argv, capsys) -> str:
    """The one line a command prints on stderr before leaving with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------- recorded metadata


@pytest.fixture
def export(tmp_path):
    model = build_model("DiT-T/4", input_size=16, num_classes=10)
    return export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None,
                                                                                    scale_factor=1.0)),
                          tmp_path / "tiny.safetensors")


def with_record(path, record_text: str):
    """The export at `path` with its model record replaced by `record_text`, written beside it."""
    out = path.with_name("edited.safetensors")
    save_file(load_file(str(path)), str(out), metadata={"format": "fastdit.export", "model_info": record_text})
    return out


def edited_record(path, edit) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        record = json.loads(handle.metadata()["model_info"])
    edit(record)
    return json.dumps(record)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["model"].update(depth="2"), r"depth = \"2\", not a int"),
    (lambda r: r["model"].update(learn_sigma=1), "learn_sigma = 1, not a bool"),
    (lambda r: r["model"].update(num_heads=2.0), "num_heads = 2.0, not a int"),
    (lambda r: r["model"].update(colour="red"), "unknown field.*'colour'"),
    (lambda r: r["latent"].update(kind="jpeg"), "latent kind 'jpeg'"),
    (lambda r: r.update(latent=[1]), "'latent' of type list"),
    (lambda r: r.update(model="DiT-T/4"), "not an object with a 'model' object"),
    (lambda r: r.update(class_names=[1, 2]), "class_names that are not a list of names"),
    (lambda r: r.update(objective="ddpm"), "objective of type str"),
    (lambda r: r.update(objective={"objective": "ddpm", "bogus": 1}), "unknown setting 'bogus'"),
], ids=["str-int", "int-bool", "float-int", "unknown-field", "latent-kind", "latent-list", "model-str",
        "class-names", "objective-str", "objective-field"])
def test_malformed_export_records_are_one_line(export, edit, message):
    path = with_record(export, edited_record(export, edit))
    with pytest.raises(UserError, match=message):
        load_model(path)


@pytest.mark.parametrize("text", ["{not json", "[" * 100_000, "[1, 2]", "null"], ids=["broken", "deep", "list", "null"])
def test_export_records_that_are_not_a_json_object(export, text):
    with pytest.raises(UserError, match="model record of .*(not valid JSON|not an object)"):
        load_model(with_record(export, text))


def test_malformed_record_in_a_training_checkpoint(tmp_path, export):
    state = load_file(str(export))
    torch.save({"format": TRAIN_FORMAT, "model_info": {"model": {"depth": [1]}}, "ema": state, "model": state},
               tmp_path / "run.pt")
    with pytest.raises(UserError, match=r"depth = \[1\], not a int"):
        load_model(tmp_path / "run.pt")


def test_malformed_record_through_the_cli(export, tmp_path, capsys):
    path = with_record(export, "{not json")
    line = cli_error(["sample", "--ckpt", str(path), "--out", str(tmp_path / "x.png"), "--no-progress"], capsys)
    assert "is not valid JSON" in line and "edited.safetensors" in line


# ---------------------------------------------------------------------------------------------- extract


def non_utf8_folder(root):
    """Class folder 'caf\\xe9' and files whose names are not UTF-8 (Latin-1 bytes)."""
    make_image_folder(root, classes=("ok",), per_class=2)
    try:
        os.mkdir(os.fsencode(root) + b"/caf\xe9")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    shutil.copy(root / "ok" / "0.png", os.fsencode(root) + b"/caf\xe9/x\xff.png")
    shutil.copy(root / "ok" / "1.png", os.fsencode(root) + b"/ok/y\xfe.png")
    return root


def test_extract_handles_names_that_are_not_utf8(tmp_path, capsys):
    # Chosen: keep them (surrogateescape, Python's own way of holding such names): they are valid
    # names on POSIX, and skipping them would drop data the user asked for.
    images = non_utf8_folder(tmp_path / "images")
    argv = ["extract", "--data-path", str(images), "--features-path", str(tmp_path / "store"), "--vae", "pixels",
            "--image-size", "8", "--num-workers", "0", "--no-progress"]
    assert main(argv) == 0
    store = LatentStore(tmp_path / "store")
    assert len(store) == 4 and store.class_names == ["caf\udce9", "ok"]
    assert main(argv) == 0  # the rerun finds the same plan (the digest of those names) and has nothing to do
    assert "nothing left to encode" in capsys.readouterr().out
    train(tiny_config(tmp_path / "runs", data_path=str(images), vae="pixels", image_size=8, num_classes=2,
                      global_batch_size=2, max_steps=1, ckpt_every=1, depth=1))


# ---------------------------------------------------------------------------------------------- resume


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    reference = train(tiny_config(tmp_path / "reference", max_steps=4, ckpt_every=2))
    damaged = train(tiny_config(tmp_path / "damaged", max_steps=4, ckpt_every=2))
    newest = damaged.run_dir / "checkpoints" / "0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short
    capsys.readouterr()
    resumed = train(tiny_config(tmp_path / "damaged", max_steps=4, ckpt_every=2))
    out = capsys.readouterr().out
    assert "warning: cannot read training checkpoint" in out and "resuming from 0000002.pt" in out
    assert (damaged.run_dir / "checkpoints" / "0000004.pt.damaged").is_file()  # kept, out of the list
    assert resumed.step == 4
    # Steps 3 and 4 trained again from step 2 give what the uninterrupted run has: bit-exact, one process.
    a, b = final_state(reference.run_dir), final_state(resumed.run_dir)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_checkpoint_without_its_rng_is_incomplete(tmp_path, capsys):
    run = train(tiny_config(tmp_path, max_steps=4, ckpt_every=2))
    path = run.run_dir / "checkpoints" / "0000004.pt"
    state = torch.load(path, weights_only=True)
    del state["rng"]
    torch.save(state, path)
    capsys.readouterr()
    assert train(tiny_config(tmp_path, max_steps=4, ckpt_every=2)).step == 4
    assert "is incomplete (no rng)" in capsys.readouterr().out


def test_no_readable_checkpoint_is_one_line_and_renames_nothing(tmp_path):
    run = train(tiny_config(tmp_path, max_steps=2, ckpt_every=2))
    path = run.run_dir / "checkpoints" / "0000002.pt"
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(UserError, match="no training checkpoint of this run reads whole"):
        train(tiny_config(tmp_path, max_steps=4, ckpt_every=2))
    assert path.is_file()


@pytest.mark.parametrize("damage", [b"\xff\xfe\x00garbage\n", b"[" * 100_000 + b"\n", b'{"step": 1.5}\n',
                                    b'{"step": true}\n', b"\x00" * 64], ids=["binary", "deep", "float", "bool", "nul"])
def test_a_damaged_metrics_file_is_cleaned_on_resume(tmp_path, damage):
    run = train(tiny_config(tmp_path, max_steps=2, ckpt_every=2))
    metrics = run.run_dir / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + damage)
    assert train(tiny_config(tmp_path, max_steps=3, ckpt_every=2)).step == 3
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_metrics_folder_is_one_line(tmp_path):
    run = train(tiny_config(tmp_path, max_steps=2, ckpt_every=2))
    (run.run_dir / "metrics.jsonl").unlink()
    (run.run_dir / "metrics.jsonl").mkdir()
    with pytest.raises(UserError, match="metrics.jsonl' is a folder"):
        train(tiny_config(tmp_path, max_steps=3, ckpt_every=2))


# ---------------------------------------------------------------------------------------------- stores


@pytest.mark.parametrize("label", [2, -1, 1000])
def test_store_labels_outside_the_classes(tmp_path, label):
    images = make_image_folder(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    store = tmp_path / "store"
    main(["extract", "--data-path", str(images), "--features-path", str(store), "--vae", "pixels",
          "--image-size", "8", "--num-workers", "0", "--no-progress"])
    shard = store / "shard-00000.safetensors"
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shard))
    tensors["label"][3] = label
    save_file(tensors, str(shard), metadata=metadata)
    with pytest.raises(UserError, match=rf"outside its 2 classes \(item 3 has label {label}, classes are 0..1\)"):
        LatentStore(store)


# ---------------------------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("side", [40, 64], ids=["warned-by-pillow", "refused-by-pillow"])
def test_a_decompression_bomb_in_an_evaluate_folder(tmp_path, monkeypatch, capsys, side):
    from PIL import Image

    # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that: 40^2 = 1600 and 64^2 = 4096
    # pixels against a limit of 1000 stand for a real bomb without making one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = tmp_path / "samples"
    folder.mkdir()
    Image.new("RGB", (side, side)).save(folder / "bomb.png")
    with pytest.raises(UserError, match=r"bomb.png' is too large to be a sample \(over Pillow's limit of 1,000"):
        FolderImages(folder)
    line = cli_error(["evaluate", str(folder), str(folder), "--metrics", "fid"], capsys)
    assert "too large to be a sample" in line


# ---------------------------------------------------------------------------------------------- flags


SEED_FLAGS = [["sample", "--seed"], ["sample-ddp", "--seed"], ["demo", "--seed"],
              ["train", "--data-path", "digits", "--global-seed"]]


@pytest.mark.parametrize("flags", SEED_FLAGS, ids=lambda f: f[0])
@pytest.mark.parametrize("value", [str(2**64), str(2**200), "-1"])
def test_every_seed_flag_refuses_seeds_outside_64_bits(flags, value, capsys, tmp_path):
    line = cli_error([*flags, value, *(["--results-dir", str(tmp_path)] if flags[0] == "train" else [])], capsys)
    assert value in line and ("2^64" in line or "18446744073709551615" in line or "negative" in line or ">= 0" in line)


def test_the_largest_seed_is_accepted():
    assert derive_seed("image-noise", MAX_SEED, 0) >= 0
    with pytest.raises(UserError, match="at most 2\\^64 - 1"):
        derive_seed("image-noise", MAX_SEED + 1, 0)  # the library's own bound (the app's seed field reaches it)


@pytest.mark.skipif(hasattr(torch.backends, "mps") and torch.backends.mps.is_available(), reason="MPS exists here")
def test_device_mps_without_mps(capsys):
    with pytest.raises(UserError, match="no usable MPS"):
        resolve_device("mps")
    assert "no usable MPS" in cli_error(["bench", "train", "--device", "mps"], capsys)


def test_device_of_a_kind_fastdit_does_not_run_on():
    with pytest.raises(UserError, match="'meta' is not one fastdit runs on"):
        resolve_device("meta")


def test_bench_with_an_unknown_model(capsys):
    line = cli_error(["bench", "train", "--model", "DiT-Q/9", "--device", "cpu"], capsys)
    assert "unknown model 'DiT-Q/9'" in line
