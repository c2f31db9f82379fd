"""The latent store on its own (no VAE): writing shards, reading them back, validation, sampling."""

import dataclasses
import json
import pickle

import pytest
import torch

from fastdit.data import LatentStore, LatentStoreDataset, item_generator, open_dataset
from fastdit.data.latent_store import StorePlan, finalize_store, open_for_writing, shard_name, write_shard
from fastdit.errors import UserError
from fastdit.latents import SD_VAE_SCALE

LATENT_SHAPE = (4, 2, 2)


def make_plan(num_sources=7, shard_size=3, dtype="float32", **changes):
    settings = dict(
        vae="stabilityai/sd-vae-ft-ema",
        scale_factor=SD_VAE_SCALE,
        image_size=16,
        latent_shape=LATENT_SHAPE,
        dtype=dtype,
        shard_size=shard_size,
        num_sources=num_sources,
        class_names=["a", "b", "c"],
        files_digest="abc",
    )
    return StorePlan(**{**settings, **changes})


def write_store(folder, plan, skip=()):
    """Write random moments for every source except `skip`; returns the (mean, std, label) written."""
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, plan.dtype)
    everything = []
    open_for_writing(folder, plan)
    for shard in range(plan.num_shards):
        sources = [s for s in plan.shard_sources(shard) if s not in skip]
        n = len(sources)
        mean = torch.randn(n, 2, *plan.latent_shape, generator=generator).to(dtype)
        std = torch.rand(n, 2, *plan.latent_shape, generator=generator).to(dtype)
        label = torch.tensor([s % 3 for s in sources])
        write_shard(folder, shard, mean=mean, std=std, label=label, source=torch.tensor(sources, dtype=torch.int64),
                    skipped=[f"img{s}.png" for s in plan.shard_sources(shard) if s in skip])
        everything += list(zip(mean, std, label.tolist()))
    return everything


def test_round_trip(tmp_path):
    plan = make_plan()
    written = write_store(tmp_path, plan)
    assert not (tmp_path / "meta.json").exists()
    with pytest.raises(UserError, match="unfinished.*rerun the same fastdit extract"):
        LatentStore(tmp_path)
    meta = finalize_store(tmp_path, plan)
    assert meta["count"] == 7 and [s["count"] for s in meta["shards"]] == [3, 3, 1]
    store = LatentStore(tmp_path)
    assert len(store) == 7 and store.class_names == ["a", "b", "c"] and store.latent_shape == LATENT_SHAPE
    assert store.labels.tolist() == [s % 3 for s in range(7)]
    for i, (mean, std, label) in enumerate(written):
        got_mean, got_std, got_label = store.read(i)
        assert torch.equal(got_mean, mean) and torch.equal(got_std, std) and got_label == label
    with pytest.raises(IndexError):
        store.read(7)


def test_float16_store_and_skipped_items(tmp_path):
    plan = make_plan(dtype="float16")
    written = write_store(tmp_path, plan, skip={1, 3, 4, 5})  # shard 1 ends up empty
    meta = finalize_store(tmp_path, plan)
    assert meta["count"] == 3 and meta["skipped"] == ["img1.png", "img3.png", "img4.png", "img5.png"]
    store = LatentStore(tmp_path)
    assert store.read(2)[0].dtype == torch.float16
    assert torch.equal(store.read(2)[0], written[2][0])  # item 2 is source 6, in shard 2 after an empty shard


def test_dataset_samples_posterior_and_flip_from_seeded_generator(tmp_path):
    plan = make_plan()
    written = write_store(tmp_path, plan)
    finalize_store(tmp_path, plan)
    dataset = LatentStoreDataset(tmp_path, seed=5)
    assert dataset.sample_shape == LATENT_SHAPE and dataset.num_classes == 3
    sides = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i, (mean, std, label) in enumerate(written):
            generator = item_generator(5, epoch, i)
            side = int(torch.randint(2, (), generator=generator))
            expected = mean[side] + std[side] * torch.randn(LATENT_SHAPE, generator=generator)
            latent, got_label = dataset[i]
            assert latent.dtype == torch.float32 and got_label == label
            torch.testing.assert_close(latent, expected, rtol=0, atol=0)
            sides.add(side)
    assert sides == {0, 1}
    means = LatentStoreDataset(tmp_path, flip=False, sample_posterior=False)
    assert torch.equal(means[3][0], written[3][0][0])
    # Workers receive a pickled copy: open shard handles are dropped and reopened there.
    dataset.set_epoch(0)
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[4][0], dataset[4][0])


def test_open_dataset_recognises_a_store(tmp_path):
    plan = make_plan()
    write_store(tmp_path, plan)
    finalize_store(tmp_path, plan)
    assert isinstance(open_dataset(tmp_path, image_size=16, vae="ema"), LatentStoreDataset)
    with pytest.raises(UserError, match="made with VAE 'stabilityai/sd-vae-ft-ema'.*uses 'stabilityai/sd-vae-ft-mse'"):
        open_dataset(tmp_path, vae="mse")


def test_check_compatible(tmp_path):
    plan = make_plan()
    write_store(tmp_path, plan)
    finalize_store(tmp_path, plan)
    store = LatentStore(tmp_path)
    store.check_compatible(vae="ema", image_size=16)
    store.check_compatible(vae="stabilityai/sd-vae-ft-ema")
    with pytest.raises(UserError, match="16px images, but this run asks for 32px; pass --image-size 16"):
        store.check_compatible(image_size=32)
    with pytest.raises(UserError, match="made with VAE"):
        store.check_compatible(vae=str(tmp_path))


def finished_store(tmp_path):
    plan = make_plan()
    write_store(tmp_path, plan)
    finalize_store(tmp_path, plan)
    return tmp_path


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / shard_name(1)).unlink(), "shard-00001.safetensors' is missing"),
        (lambda root: (root / shard_name(0)).write_bytes((root / shard_name(0)).read_bytes()[:-10]), "is damaged"),
        (
            lambda root: (root / shard_name(2)).write_bytes((root / shard_name(0)).read_bytes()),
            "holds 3 items but meta.json says 1",
        ),
        (lambda root: (root / "meta.json").write_text("{"), "cannot read"),
        (lambda root: (root / "meta.json").write_text(json.dumps({"format_version": 99})), "format version 99"),
    ],
    ids=["missing-shard", "truncated-shard", "wrong-count", "bad-json", "version"],
)
def test_damaged_store_is_rejected(tmp_path, damage, message):
    damage(finished_store(tmp_path))
    with pytest.raises(UserError, match=message):
        LatentStore(tmp_path)


def test_not_a_store(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        LatentStore(tmp_path / "nope")
    with pytest.raises(UserError, match="not a latent store"):
        LatentStore(tmp_path)
    (tmp_path / "store.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file; pass the folder `fastdit extract` wrote"):
        LatentStore(tmp_path / "store.safetensors")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "nope", "latent store '.*nope' does not exist; create it with `fastdit extract`"),
        (lambda root: root, "is not a latent store .*; create one with `fastdit extract`, or pass a folder of images "
                            "as --data-path"),
    ],
    ids=["missing", "empty-folder"],
)
def test_training_on_a_wrong_features_path_speaks_of_the_store(tmp_path, make, message):
    # These used to fall through to the image-folder reader, whose messages tell the user to fix --data-path.
    from fastdit.train.config import TrainConfig
    from fastdit.train.training_data import open_training_data

    config = TrainConfig.create(features_path=str(make(tmp_path)), image_size=16)
    with pytest.raises(UserError, match=message):
        open_training_data(config, torch.device("cpu"))


def test_writing_refuses_other_settings_and_foreign_folders(tmp_path):
    plan = make_plan()
    write_store(tmp_path / "store", plan)
    (tmp_path / "store" / ".shard-00009.safetensors.x1.tmp").write_bytes(b"half")
    assert open_for_writing(tmp_path / "store", plan) == []  # all written; stale temporary files removed
    assert not list((tmp_path / "store").glob(".*.tmp"))
    with pytest.raises(UserError, match=r"other settings.*image_size: 16 -> 32"):
        open_for_writing(tmp_path / "store", make_plan(image_size=32))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no latent store"):
        open_for_writing(tmp_path / "other", plan)


def write_images(folder, plan, generator):
    """Random crops for every item of every shard of `plan` (no skips); returns them, (3, S, S) uint8."""
    from fastdit.data.latent_store import encode_png

    crops = []
    open_for_writing(folder, plan)
    for shard in range(plan.num_shards):
        sources = list(plan.shard_sources(shard))
        shard_crops = [torch.randint(0, 256, (3, plan.image_size, plan.image_size), generator=generator,
                                     dtype=torch.uint8) for _ in sources]
        write_shard(folder, shard, mean=torch.randn(len(sources), 2, *plan.latent_shape, generator=generator),
                    std=torch.rand(len(sources), 2, *plan.latent_shape, generator=generator),
                    label=torch.tensor([s % 3 for s in sources]), source=torch.tensor(sources), skipped=[],
                    images=[encode_png(crop) for crop in shard_crops])
        crops += shard_crops
    return crops


def test_images_round_trip_and_follow_the_flip(tmp_path):
    plan = make_plan(with_images=True)
    crops = write_images(tmp_path, plan, torch.Generator().manual_seed(0))
    meta = finalize_store(tmp_path, plan)
    assert meta["with_images"] is True
    store = LatentStore(tmp_path)
    assert store.has_images and all(torch.equal(store.read_image(i), crops[i]) for i in range(7))
    dataset = LatentStoreDataset(tmp_path, seed=2, with_images=True)
    for i in range(7):
        side = int(torch.randint(2, (), generator=item_generator(2, 0, i)))
        image = crops[i].float() / 127.5 - 1
        assert torch.equal(dataset[i][2], image.flip(-1) if side else image)
    unflipped = LatentStoreDataset(tmp_path, flip=False, with_images=True)
    assert torch.equal(unflipped[5][2], crops[5].float() / 127.5 - 1)


def test_a_store_with_images_refuses_a_shard_without_them(tmp_path):
    write_store(tmp_path, make_plan())
    finalize_store(tmp_path, make_plan())
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "with_images": True}))
    with pytest.raises(UserError, match=r"shard-00000.safetensors' does not match the store: holds no images"):
        LatentStore(tmp_path)


def test_images_asked_of_a_store_without_them(tmp_path):
    finished_store(tmp_path)  # written before data_path was recorded: the message leaves a placeholder
    for make in (lambda: LatentStoreDataset(tmp_path, with_images=True), lambda: LatentStore(tmp_path).read_image(0)):
        with pytest.raises(UserError) as refusal:
            make()
        assert str(refusal.value) == (
            f"latent store {str(tmp_path)!r} holds no images (it was extracted without --with-images); add them "
            f"with `fastdit extract --data-path <the image folder> --features-path {tmp_path} --image-size 16 "
            f"--vae ema --shard-size 3 --dtype float32 --with-images`, which encodes the store again with each "
            f"image beside its latents"
        )
    finalize_store(tmp_path, make_plan(), data_path=tmp_path / "my images")
    with pytest.raises(UserError, match=f"--data-path '{tmp_path}/my images' --features-path"):
        LatentStoreDataset(tmp_path, with_images=True)


def test_asking_for_images_reopens_a_store_made_without_them(tmp_path):
    plan = make_plan()
    finished_store(tmp_path)
    with_images = dataclasses.replace(plan, with_images=True)
    # Every shard is encoded again (with its images); until then the store is unfinished.
    assert open_for_writing(tmp_path, with_images) == [0, 1, 2]
    assert not (tmp_path / "meta.json").exists()
    assert json.loads((tmp_path / "plan.json").read_text())["with_images"] is True
    write_images(tmp_path, with_images, torch.Generator().manual_seed(1))
    assert open_for_writing(tmp_path, with_images) == []
    # Back to no images would leave shards of both kinds.
    with pytest.raises(UserError, match=r"with_images: true -> false"):
        open_for_writing(tmp_path, plan)


def test_format_size():
    from fastdit.data.latent_store import format_size

    assert format_size(0) == "0 bytes" and format_size(999) == "999 bytes"
    assert format_size(1234) == "1.23 kB" and format_size(1_230_000_000) == "1.23 GB"
    assert format_size(5 * 10**15) == "5000.00 TB"


def test_alignment_on_a_store_without_images_gives_the_command_that_adds_them(tmp_path):
    # REPA's encoder must see the image of each latent: a store extracted without them is refused at
    # the start of training, with the extract command to run.
    from fastdit.train.config import TrainConfig
    from fastdit.train.training_data import open_training_data

    plan = make_plan()
    write_store(tmp_path / "store", plan)
    finalize_store(tmp_path / "store", plan)
    config = TrainConfig.create(features_path=str(tmp_path / "store"), image_size=16, repa="dinov2-vitb14")
    with pytest.raises(UserError, match="holds no images .*fastdit extract .*--with-images"):
        open_training_data(config, torch.device("cpu"))
    assert len(open_training_data(TrainConfig.create(features_path=str(tmp_path / "store"), image_size=16),
                                  torch.device("cpu")).dataset) == plan.num_sources
