"""`fastdit extract` end to end with a tiny VAE: the store, resume, bad input, compatibility checks."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.cli import main
from fastdit.data import LatentStore, LatentStoreDataset, item_generator, list_image_folder, load_image
from fastdit.data import latent_store
from fastdit.data.latent_store import shard_name
from fastdit.errors import UserError
from fastdit.latents import SD_VAE_SCALE, load_latent_space

from conftest import make_image_folder, save_tiny_vae

IMAGE_SIZE = 16


@pytest.fixture
def images(tmp_path):
    return make_image_folder(tmp_path / "images")


def extract(data, store, vae, *extra):
    argv = ["extract", "--data-path", str(data), "--features-path", str(store), "--image-size", str(IMAGE_SIZE),
            "--vae", vae, "--batch-size", "2", "--shard-size", "5", "--num-workers", "0", "--no-progress", *extra]
    return main(argv)


def read_all(store):
    """meta.json and every tensor of every shard."""
    from safetensors.torch import load_file

    meta = json.loads((store / "meta.json").read_text())
    shards = [load_file(store / shard["file"]) for shard in meta["shards"]]
    return meta, shards


def assert_same_store(a, b, atol=0.0):
    meta_a, shards_a = read_all(a)
    meta_b, shards_b = read_all(b)
    assert meta_a == meta_b
    for shard_a, shard_b in zip(shards_a, shards_b, strict=True):
        assert shard_a.keys() == shard_b.keys()
        for key in shard_a:
            torch.testing.assert_close(shard_a[key], shard_b[key], rtol=0, atol=atol)


def test_extract_writes_moments_of_image_and_flip(images, tmp_path, tiny_vae, capsys):
    store = tmp_path / "store"
    assert extract(images, store, tiny_vae, "--dtype", "float32") == 0
    assert "12 images in 3 shard(s)" in capsys.readouterr().out
    loaded = LatentStore(store)
    assert len(loaded) == 12 and loaded.class_names == ["cat", "dog", "eel"] and loaded.latent_shape == (4, 2, 2)
    assert loaded.meta["vae"] == os.path.realpath(tiny_vae)
    assert loaded.meta["scale_factor"] == SD_VAE_SCALE and loaded.meta["dtype"] == "float32"
    index = list_image_folder(images)
    assert loaded.labels.tolist() == index.labels
    # Item 7 against a direct encoding of the centre-cropped image and its mirror.
    space = load_latent_space(tiny_vae)
    image = load_image(images / index.files[7], IMAGE_SIZE)
    mean, std = space.encode_moments(torch.stack([image, image.flip(-1)]))
    got_mean, got_std, label = loaded.read(7)
    torch.testing.assert_close(got_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_std, std, rtol=1e-4, atol=1e-5)
    assert label == index.labels[7] == 1
    latent, label = LatentStoreDataset(store)[0]
    assert latent.shape == (4, 2, 2) and label == 0


def test_killed_extraction_resumes_to_the_same_store(images, tmp_path, tiny_vae, monkeypatch, capsys):
    extract(images, tmp_path / "reference", tiny_vae)

    real_write = latent_store.write_shard
    written = []

    def write_then_die(folder, shard, **tensors):
        if len(written) == 2:
            raise KeyboardInterrupt  # as if killed while encoding the third shard
        written.append(shard)
        return real_write(folder, shard, **tensors)

    store = tmp_path / "store"
    monkeypatch.setattr(latent_store, "write_shard", write_then_die)
    assert extract(images, store, tiny_vae) == 130
    assert sorted(p.name for p in store.iterdir()) == ["plan.json", *map(shard_name, (0, 1))]
    with pytest.raises(UserError, match="unfinished"):
        LatentStore(store)
    (store / ".shard-00002.safetensors.abc123.tmp").write_bytes(b"half a shard")  # what SIGKILL leaves

    written.clear()
    def write_and_record(folder, shard, **tensors):
        written.append(shard)
        return real_write(folder, shard, **tensors)

    monkeypatch.setattr(latent_store, "write_shard", write_and_record)
    assert extract(images, store, tiny_vae) == 0
    assert written == [2]  # only the missing shard is encoded again
    assert not list(store.glob(".*.tmp"))
    assert_same_store(store, tmp_path / "reference")

    capsys.readouterr()
    assert extract(images, store, tiny_vae) == 0  # a finished store: checked, nothing re-encoded
    assert written == [2] and "nothing left to encode" in capsys.readouterr().out


def cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_or_empty_data_folder(tmp_path, tiny_vae, capsys):
    store = tmp_path / "store"
    args = ["extract", "--features-path", str(store), "--vae", tiny_vae, "--data-path"]
    err = cli_error(capsys, *args, str(tmp_path / "nope"))
    assert "fastdit extract: error: data folder" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, *args, str(tmp_path / "empty"))
    assert "no class subfolders" in err
    assert not store.exists()


def test_settings_that_cannot_work_are_refused(images, tmp_path, tiny_vae, capsys):
    base = ["extract", "--data-path", str(images), "--features-path", str(tmp_path / "s"), "--vae", tiny_vae]
    assert "not divisible by 8" in cli_error(capsys, *base, "--image-size", "12")
    assert "--batch-size must be a positive integer, got 0" in cli_error(capsys, *base, "--batch-size", "0")
    assert "is not a diffusers AutoencoderKL folder" in cli_error(capsys, *base[:-1], str(tmp_path))


def test_rerun_with_other_settings_keeps_the_store(images, tmp_path, tiny_vae, capsys):
    store = tmp_path / "store"
    extract(images, store, tiny_vae)
    before = read_all(store)
    with pytest.raises(SystemExit):
        main(["extract", "--data-path", str(images), "--features-path", str(store), "--vae", tiny_vae,
              "--image-size", "32", "--shard-size", "5", "--no-progress", "--num-workers", "0"])
    assert "image_size: 16 -> 32" in capsys.readouterr().err
    (images / "cat" / "extra.png").write_bytes((images / "cat" / "0.png").read_bytes())
    with pytest.raises(SystemExit):
        extract(images, store, tiny_vae)
    assert "files_digest" in capsys.readouterr().err
    after = read_all(store)
    assert before[0] == after[0] and all(torch.equal(a[k], b[k]) for a, b in zip(before[1], after[1]) for k in a)


def test_corrupt_images_are_named_then_skipped_on_request(images, tmp_path, tiny_vae, capsys):
    (images / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    store = tmp_path / "store"
    err = cli_error(capsys, "extract", "--data-path", str(images), "--features-path", str(store), "--vae", tiny_vae,
                    "--image-size", str(IMAGE_SIZE), "--shard-size", "5", "--num-workers", "0", "--no-progress")
    assert "1 image(s) could not be read: 'dog/2.png' (UnidentifiedImageError" in err and "--skip-corrupt" in err
    # dog/2.png is source 6, in shard 1; shards 0 and 2 are written and kept.
    assert sorted(p.name for p in store.glob("shard-*")) == ["shard-00000.safetensors", "shard-00002.safetensors"]

    assert extract(images, store, tiny_vae, "--skip-corrupt") == 0
    assert "11 images in 3 shard(s), 1 corrupt image(s) skipped" in capsys.readouterr().out
    loaded = LatentStore(store)
    assert len(loaded) == 11 and loaded.meta["skipped"] == ["dog/2.png"]
    from safetensors.torch import load_file

    assert load_file(store / "shard-00001.safetensors")["source"].tolist() == [5, 7, 8, 9]


def test_images_without_a_fixed_range_are_refused_or_skipped(images, tmp_path, tiny_vae, capsys):
    # A float TIFF (mode "F") has no white level: refused by name and mode, and left out with
    # --skip-corrupt like an unreadable file. A 16-bit PNG is scaled, so it is neither refused nor skipped.
    rng = np.random.default_rng(0)
    (images / "dog" / "2.png").unlink()
    Image.fromarray(rng.random((20, 20), dtype=np.float32)).save(images / "dog" / "2.tif")
    Image.fromarray(rng.integers(0, 65536, (20, 20), dtype=np.uint16)).save(images / "eel" / "0.png")
    store = tmp_path / "store"
    err = cli_error(capsys, "extract", "--data-path", str(images), "--features-path", str(store), "--vae", tiny_vae,
                    "--image-size", str(IMAGE_SIZE), "--shard-size", "5", "--num-workers", "0", "--no-progress")
    assert "1 image(s) could not be read: 'dog/2.tif' (Pillow mode 'F' (32-bit float samples)" in err

    assert extract(images, store, tiny_vae, "--skip-corrupt") == 0
    assert "1 corrupt image(s) skipped" in capsys.readouterr().out
    assert LatentStore(store).meta["skipped"] == ["dog/2.tif"]


def test_check_compatible_after_extraction(images, tmp_path, tiny_vae):
    store = tmp_path / "store"
    extract(images, store, tiny_vae)
    other_vae = save_tiny_vae(tmp_path / "other-vae", seed=1)
    loaded = LatentStore(store)
    loaded.check_compatible(vae=tiny_vae, image_size=IMAGE_SIZE)
    with pytest.raises(UserError, match="other-vae"):
        loaded.check_compatible(vae=other_vae)
    with pytest.raises(UserError, match="pass --image-size 16"):
        LatentStoreDataset(store, vae=tiny_vae, image_size=256)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data-path", "--features-path", "--image-size", "--vae", "--batch-size", "--shard-size",
                 "--num-workers", "--dtype", "--skip-corrupt", "--device"):
        assert flag in out
    assert "--with-images" in out


# ----------------------------------------------------------------------------------------------------
# --with-images: the crop the VAE encoded, stored beside its latents


class HalvingSpace:
    """A stand-in VAE whose "latent" is the image averaged over 2x2 blocks, with no posterior noise:
    a latent then shows which image, and which side of it, it was made from."""

    channels, name, scale_factor, downsample = 3, "halving-stand-in", 1.0, 2

    def encode_moments(self, images):
        mean = torch.nn.functional.avg_pool2d(images, 2)
        return mean, torch.zeros_like(mean)

    def latent_size(self, image_size):
        return image_size // 2

    def to(self, device):
        return self


def test_images_are_flipped_exactly_with_their_latents(images, tmp_path, monkeypatch, capsys):
    from fastdit import latents

    monkeypatch.setattr(latents, "load_latent_space", lambda name, **_: HalvingSpace())
    store = tmp_path / "store"
    assert extract(images, store, "halving", "--dtype", "float32", "--with-images") == 0
    assert LatentStore(store).meta["with_images"] is True
    index = list_image_folder(images)
    dataset = LatentStoreDataset(store, seed=3, with_images=True)
    without = LatentStoreDataset(store, seed=3)
    sides = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        without.set_epoch(epoch)
        for i in range(len(dataset)):
            latent, label, image = dataset[i]
            assert image.dtype == torch.float32 and image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
            assert label == index.labels[i]
            assert image.min() >= -1 and image.max() <= 1
            # The latent is the halved image it came with (so both are flipped, or neither)...
            torch.testing.assert_close(latent, torch.nn.functional.avg_pool2d(image[None], 2)[0], rtol=0, atol=1e-6)
            # ...the image is the crop of the file, mirrored by the draw that picks the latent's side...
            side = int(torch.randint(2, (), generator=item_generator(3, epoch, i)))
            crop = load_image(images / index.files[i], IMAGE_SIZE)
            assert torch.equal(image, crop.flip(-1) if side else crop)
            sides.add(side)
            # ...and asking for images changes no latent.
            assert torch.equal(without[i][0], latent) and without[i][1] == label
    assert sides == {0, 1}


def test_killed_extraction_with_images_resumes_to_the_same_store(images, tmp_path, tiny_vae, monkeypatch, capsys):
    extract(images, tmp_path / "reference", tiny_vae, "--with-images")

    real_write = latent_store.write_shard
    written = []

    def write_then_die(folder, shard, **tensors):
        if len(written) == 1:
            raise KeyboardInterrupt  # as if killed while encoding the second shard
        written.append(shard)
        return real_write(folder, shard, **tensors)

    store = tmp_path / "store"
    monkeypatch.setattr(latent_store, "write_shard", write_then_die)
    assert extract(images, store, tiny_vae, "--with-images") == 130
    assert sorted(p.name for p in store.iterdir()) == ["plan.json", shard_name(0)]
    (store / ".shard-00001.safetensors.abc123.tmp").write_bytes(b"half a shard")  # what SIGKILL leaves

    written.clear()
    monkeypatch.setattr(latent_store, "write_shard", lambda folder, shard, **tensors: (
        written.append(shard), real_write(folder, shard, **tensors))[1])
    assert extract(images, store, tiny_vae, "--with-images") == 0
    assert written == [1, 2]
    assert not list(store.glob(".*.tmp"))
    assert_same_store(store, tmp_path / "reference")
    # Resuming without the flag would write shards without images into a store that has them.
    with pytest.raises(SystemExit):
        extract(images, store, tiny_vae)
    assert "with_images: true -> false" in capsys.readouterr().err


def test_with_images_on_a_store_without_them_gives_the_command_that_adds_them(
    images, tmp_path, tiny_vae, monkeypatch, capsys
):
    import shlex

    extract(images, tmp_path / "reference", tiny_vae, "--with-images")
    store = tmp_path / "store"
    extract(images, store, tiny_vae)
    latents_before = [LatentStore(store).read(i)[0] for i in range(12)]
    with pytest.raises(UserError) as refusal:
        LatentStoreDataset(store, with_images=True)
    command = (f"fastdit extract --data-path {images} --features-path {store} --image-size 16 --vae {tiny_vae} "
               f"--shard-size 5 --with-images")
    assert str(refusal.value) == (
        f"latent store {str(store)!r} holds no images (it was extracted without --with-images); add them with "
        f"`{command}`, which encodes the store again with each image beside its latents"
    )

    # The command works, and is resumable too: killed after one shard, then run again.
    argv = shlex.split(command)[1:] + ["--batch-size", "2", "--num-workers", "0", "--no-progress"]
    real_write = latent_store.write_shard
    calls = []

    def write_then_die(folder, shard, **tensors):
        calls.append(shard)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(folder, shard, **tensors)

    monkeypatch.setattr(latent_store, "write_shard", write_then_die)
    assert main(argv) == 130
    with pytest.raises(UserError, match="unfinished"):  # meta.json no longer claims a finished store
        LatentStore(store)
    monkeypatch.setattr(latent_store, "write_shard", real_write)
    assert main(argv) == 0
    assert_same_store(store, tmp_path / "reference")
    dataset = LatentStoreDataset(store, with_images=True)
    assert len(dataset[0]) == 3
    assert all(torch.equal(LatentStore(store).read(i)[0], latents_before[i]) for i in range(12))


def test_every_extraction_prints_the_size_on_disk(images, tmp_path, tiny_vae, capsys):
    cases = [(tmp_path / "plain", (), ""), (tmp_path / "with-images", ("--with-images",), ", crops stored")]
    for store, extra, what in cases:
        assert extract(images, store, tiny_vae, *extra) == 0
        size = latent_store.size_on_disk(store)
        assert size == sum(path.stat().st_size for path in store.iterdir())
        out = capsys.readouterr().out
        assert f"12 images in 3 shard(s){what}, {latent_store.format_size(size)} on disk (12 encoded in" in out
        assert extract(images, store, tiny_vae, *extra) == 0  # and when there is nothing left to encode
        assert f", {latent_store.format_size(size)} on disk (nothing left to encode)" in capsys.readouterr().out
    # Crops of 16px noise do not compress: the images add about their raw size, 3 x 16 x 16 bytes each.
    added = latent_store.size_on_disk(tmp_path / "with-images") - latent_store.size_on_disk(tmp_path / "plain")
    assert added > 12 * 768


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_called_png_is_refused_or_skipped_not_waited_on(images, tmp_path, tiny_vae, capsys):
    """Opening a FIFO for reading blocks until a writer comes. A watchdog plays that writer after 20 s, so
    that a reader which waits makes this test fail (the `released` flag) instead of hanging the suite."""
    import threading

    fifo = images / "dog" / "9.png"
    os.mkfifo(fifo)
    released, done = [], threading.Event()

    def watchdog():
        if done.wait(20):
            return
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader is waiting: end its read
                released.append(True)
            except OSError:  # no reader yet (ENXIO)
                pass
            done.wait(0.1)

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        store = tmp_path / "store"
        err = cli_error(capsys, "extract", "--data-path", str(images), "--features-path", str(store), "--vae", tiny_vae,
                        "--image-size", str(IMAGE_SIZE), "--shard-size", "5", "--num-workers", "0", "--no-progress")
        assert "1 image(s) could not be read: 'dog/9.png' (not a regular file (a named pipe, socket or device))" in err
        assert extract(images, store, tiny_vae, "--skip-corrupt") == 0
        assert LatentStore(store).meta["skipped"] == ["dog/9.png"]
    finally:
        done.set()
        thread.join()
    assert not released
