"""Image folders: listing, the ADM centre crop, decoding errors and seeded flips."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.data import (
    CorruptImageError,
    ImageFolderDataset,
    center_crop,
    item_generator,
    list_image_folder,
    load_image,
)
from fastdit.errors import UserError


def random_image(height, width, seed=0, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode)


def test_center_crop_takes_the_middle_with_adm_offsets():
    # No resizing (short side 8 = size, < 2x size): the crop alone shows the offsets (W - size) // 2.
    pixels = np.asarray(random_image(8, 11))
    cropped = np.asarray(center_crop(Image.fromarray(pixels), 8))
    np.testing.assert_array_equal(cropped, pixels[:, 1:9])  # (11 - 8) // 2 = 1, not 2
    tall = np.asarray(random_image(13, 8, seed=1))
    np.testing.assert_array_equal(np.asarray(center_crop(Image.fromarray(tall), 8)), tall[2:10])


def test_center_crop_halves_with_box_filter_then_bicubic():
    # 64 -> 32 -> 16 by two BOX halvings (each a 2x2 average), then no BICUBIC change at size 16.
    pixels = np.asarray(random_image(64, 64, seed=2)).astype(np.float64)
    expected = pixels.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    result = np.asarray(center_crop(Image.fromarray(pixels.astype(np.uint8)), 16)).astype(np.float64)
    # Pillow's fixed-point 8-bit filters are off by up to 2; one BICUBIC 64 -> 16 resize is off by ~27.
    assert np.abs(result - expected).max() <= 2.0
    # A non-square image ends with short side = size and is cropped to a square.
    assert center_crop(random_image(50, 37, seed=3), 16).size == (16, 16)
    assert center_crop(random_image(5, 7, seed=4), 16).size == (16, 16)  # upscaled when smaller


def as_model_input(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (3, H, W) float32 in [-1, 1], the scaling `load_image` promises."""
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0


def test_load_image_converts_8_bit_modes_to_rgb(tmp_path):
    # 16 x 16 at size 16: no resize and no crop, so the result is the file's own pixels, scaled.
    gray, rgba = random_image(16, 16, mode="L"), random_image(16, 16, seed=1, mode="RGBA")
    gray.save(tmp_path / "gray.png")
    rgba.save(tmp_path / "alpha.png")
    palette = random_image(16, 16, seed=2).quantize(colors=16)
    palette.save(tmp_path / "palette.png")
    expected = {
        "gray.png": np.repeat(np.asarray(gray)[..., None], 3, axis=2),  # grey copied to R, G and B
        "alpha.png": np.asarray(rgba)[..., :3],  # alpha dropped, as ADM's convert("RGB") does
        "palette.png": np.asarray(palette.convert("RGB")),  # palette indices looked up
    }
    for name, rgb in expected.items():
        # Same float32 operations on the same uint8 values on both sides: equal up to one rounding.
        torch.testing.assert_close(load_image(tmp_path / name, 16), as_model_input(rgb), rtol=0, atol=1e-6)


def write_pgm_16_bit(path, samples: np.ndarray):
    """A binary PGM with maxval 65535 (big-endian samples), which Pillow opens in mode "I"."""
    height, width = samples.shape
    path.write_bytes(f"P5 {width} {height} 65535\n".encode() + samples.astype(">u2").tobytes())


def test_16_bit_images_are_scaled_by_their_range_not_clipped(tmp_path):
    # A full-range 16-bit ramp: Pillow's own convert("RGB") clips everything above 255, so ~99.6% of
    # these pixels would come out white. Scaled by 1/257 they match the 8-bit image rint(value / 257).
    samples = np.random.default_rng(5).integers(0, 65536, (16, 16), dtype=np.uint16)
    samples[0, :2] = (0, 65535)  # both ends of the range: 0 -> -1 and 65535 -> +1 exactly
    eight_bit = np.rint(samples / 257.0).astype(np.uint8)
    Image.fromarray(samples).save(tmp_path / "png16.png")  # mode "I;16"
    Image.fromarray(samples).save(tmp_path / "tiff16.tif")  # mode "I;16"
    Image.fromarray(samples.astype(">u2")).save(tmp_path / "tiff16b.tif")  # mode "I;16B"
    write_pgm_16_bit(tmp_path / "pgm16.pgm", samples)  # mode "I"
    expected = as_model_input(np.repeat(eight_bit[..., None], 3, axis=2))
    for name in ("png16.png", "tiff16.tif", "tiff16b.tif", "pgm16.pgm"):
        torch.testing.assert_close(load_image(tmp_path / name, 16), expected, rtol=0, atol=1e-6, msg=name)

    # The training dataset decodes through the same conversion.
    (tmp_path / "set" / "a").mkdir(parents=True)
    Image.fromarray(samples).save(tmp_path / "set" / "a" / "0.png")
    image, _ = ImageFolderDataset(tmp_path / "set", 16, flip=False)[0]
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)


def test_float_and_32_bit_integer_images_are_refused_naming_the_mode(tmp_path):
    rng = np.random.default_rng(6)
    Image.fromarray(rng.random((16, 16), dtype=np.float32)).save(tmp_path / "float.tif")  # in [0, 1]: would be black
    Image.fromarray(rng.integers(0, 2**20, (16, 16), dtype=np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(CorruptImageError, match=r"float\.tif.*mode 'F' \(32-bit float"):
        load_image(tmp_path / "float.tif", 16)
    with pytest.raises(CorruptImageError, match=r"int32\.tif.*mode 'I' \(32-bit integer"):
        load_image(tmp_path / "int32.tif", 16)


def test_load_image_names_a_corrupt_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    buffer = tmp_path / "truncated.png"
    random_image(32, 32).save(buffer)
    buffer.write_bytes(buffer.read_bytes()[:200])
    for name in ("bad.png", "truncated.png"):
        with pytest.raises(CorruptImageError, match=name):
            load_image(tmp_path / name, 16)


def make_folder(root, counts):
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            folder = root / name / ("nested" if i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            random_image(12, 12, seed=10 * c + i).save(folder / f"{i}.png")
    return root


def test_list_image_folder_sorts_classes_and_files(tmp_path):
    make_folder(tmp_path, {"zebra": 3, "ant": 2})
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    index = list_image_folder(tmp_path)
    assert index.class_names == ["ant", "zebra"]
    assert index.files == ["ant/0.png", "ant/nested/1.png", "zebra/0.png", "zebra/2.png", "zebra/nested/1.png"]
    assert index.labels == [0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: (root / "file.png").write_bytes(b"x") and root / "file.png", "is a file"),
        (lambda root: root, "no class subfolders"),
        (lambda root: (root / "a").mkdir() or root, "no images"),
        (lambda root: make_folder(root, {"a": 1}) and (root / "b").mkdir() or root, "'b'.*contain no images"),
    ],
    ids=["missing", "file", "no-subfolders", "no-images", "empty-class"],
)
def test_list_image_folder_rejects_bad_folders(tmp_path, setup, message):
    with pytest.raises(UserError, match=message):
        list_image_folder(setup(tmp_path))


def test_item_generator_depends_on_seed_epoch_and_index():
    draw = lambda *key: torch.randn(4, generator=item_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 0, 6))
    assert not torch.equal(draw(0, 0, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 0, 5), draw(1, 0, 5))


def test_image_folder_dataset_flips_reproducibly(tmp_path):
    make_folder(tmp_path, {"a": 4, "b": 4})
    dataset = ImageFolderDataset(tmp_path, 8, seed=3)
    plain = ImageFolderDataset(tmp_path, 8, flip=False)
    assert len(dataset) == 8 and dataset.num_classes == 2 and dataset.sample_shape == (3, 8, 8)
    flips = {}
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            image, label = dataset[i]
            original, original_label = plain[i]
            assert label == original_label == (i >= 4)
            flipped = torch.equal(image, original.flip(-1))
            assert flipped or torch.equal(image, original)
            flips[epoch, i] = flipped
            assert torch.equal(dataset[i][0], image)  # same (seed, epoch, index) -> same image
    assert 0 < sum(flips.values()) < len(flips)  # both orientations occur
    assert any(flips[0, i] != flips[1, i] for i in range(8))  # fresh flips each epoch
