"""Bad input to `fastdit evaluate`: each case ends in one clear message naming the value and the fix."""

import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.cli import main
from fastdit.errors import DownloadError, UserError
from fastdit.evaluate import EvalStatistics, compare, load_inception, save_statistics, statistics_for_path
from fastdit.evaluate.inception import random_inception_state_dict
from fastdit.evaluate.sources import open_images


def fake_stats(image_size, dim=2048, spatial_dim=2023):
    return EvalStatistics(
        mu=np.zeros(dim), sigma=np.eye(dim), mu_s=np.zeros(spatial_dim), sigma_s=np.eye(spatial_dim),
        num_images=10, image_size=image_size, source="fake",
    )  # fmt: skip


def run_cli(argv, capsys):
    """Run the CLI expecting a user error; return its one-line message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "array, message",
    [
        (np.random.rand(2, 8, 8, 3).astype(np.float32), r"float32 values; expected uint8 in \[0, 255\]"),
        (np.zeros((2, 3, 8, 8), np.uint8), r"shape \(2, 3, 8, 8\); expected N x H x W x 3.*transpose"),
        (np.zeros((8, 8, 3), np.uint8), r"shape \(8, 8, 3\)"),
        (np.zeros((0, 8, 8, 3), np.uint8), "contains no images"),
        (np.array(["a", "b"]).reshape(2, 1, 1, 1).repeat(3, axis=3), "dtype <U1; expected uint8"),
    ],
)
def test_bad_npz_arrays_are_rejected(tmp_path, array, message):
    np.savez(tmp_path / "samples.npz", array)
    with pytest.raises(UserError, match=message):
        open_images(tmp_path / "samples.npz")


def test_npz_integer_values_out_of_range(tmp_path):
    images = np.zeros((3, 4, 4, 3), np.int16)
    images[2, 0, 0, 0] = 300
    np.savez(tmp_path / "samples.npz", images)
    source = open_images(tmp_path / "samples.npz")  # integer dtypes are fine while in [0, 255]
    with pytest.raises(UserError, match=r"values in \[0, 300\].*expected \[0, 255\]"):
        list(source.batches(2))


def test_npz_without_images_and_not_an_archive(tmp_path):
    np.savez(tmp_path / "labels.npz", labels=np.arange(3))
    with pytest.raises(UserError, match="no image array 'arr_0' \\(it holds labels\\)"):
        open_images(tmp_path / "labels.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read .* as an .npz archive"):
        open_images(tmp_path / "broken.npz")


def test_folders_empty_mixed_sizes_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images .* found in folder"):
        open_images(tmp_path / "empty")
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (16, 8)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(UserError, match="b.png' is 16x8 but .*a.png' is 8x8"):
        list(open_images(tmp_path / "mixed").batches(4))
    with pytest.raises(UserError, match="does not exist"):
        open_images(tmp_path / "nowhere")


def test_folder_images_use_their_real_range(tmp_path):
    # A 16-bit sample folder is scaled by 1/257 like every other reader of images, not clipped at 255;
    # a float TIFF has no range to scale by and is refused by name.
    (tmp_path / "wide").mkdir()
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(ramp).save(tmp_path / "wide" / "a.png")
    (batch,) = list(open_images(tmp_path / "wide").batches(4))
    assert np.array_equal(batch[0, :, :, 0], np.rint(ramp / 257.0).astype(np.uint8))
    (tmp_path / "float").mkdir()
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float" / "a.tif")
    with pytest.raises(UserError, match="a.tif'.*mode 'F'"):
        open_images(tmp_path / "float")


def test_reference_of_another_resolution():
    with pytest.raises(UserError, match="samples are 256x256 but the reference fake is 512x512.*same resolution"):
        compare(fake_stats((256, 256)), fake_stats((512, 512)))


def test_cli_rejects_another_resolution_before_running_inception(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "s256.npz", np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "r512.npz", np.zeros((4, 32, 32, 3), np.uint8))
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "no-cache"))  # no weights: must not get that far
    err = run_cli(["evaluate", str(tmp_path / "s256.npz"), str(tmp_path / "r512.npz")], capsys)
    assert "samples are 16x16 but the reference" in err and "is 32x32" in err


def test_reference_of_another_statistics_dimension(tmp_path):
    np.savez(
        tmp_path / "ref.npz",
        arr_0=np.zeros((4, 8, 8, 3), np.uint8),
        mu=np.zeros(64), sigma=np.eye(64), mu_s=np.zeros(2023), sigma_s=np.eye(2023),
    )  # fmt: skip
    with pytest.raises(UserError, match=r"'mu' of shape \(64,\), expected \(2048,\)"):
        statistics_for_path(tmp_path / "ref.npz", extractor=_NoNetwork(), reference=True, progress=False)
    bad = fake_stats((8, 8), dim=1008)
    with pytest.raises(UserError, match="remake it with `fastdit evaluate --make-ref`"):
        compare(fake_stats((8, 8)), bad)


class _NoNetwork:
    """Stands in for the extractor where the check must fire before any image is processed."""

    batch_size = 4
    device = torch.device("cpu")

    def __call__(self, images):
        from fastdit.evaluate.inception import InceptionOutputs

        n = len(images)
        return InceptionOutputs(pool=torch.rand(n, 2048), spatial=torch.rand(n, 2023), logits=torch.rand(n, 1008))


def test_statistics_file_from_newer_version(tmp_path):
    path = save_statistics(fake_stats((8, 8)), tmp_path / "stats.npz")
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["fastdit_eval_stats"] = np.array(99)
    np.savez(path, **arrays)
    with pytest.raises(UserError, match="newer fastdit"):
        statistics_for_path(path, extractor=None)


def test_missing_weights_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DownloadError, match="pt_inception-2015-12-05-6726825d.pth.*--inception-weights PATH"):
        load_inception(progress=False)
    np.savez(tmp_path / "s.npz", np.zeros((2, 8, 8, 3), np.uint8))
    err = run_cli(["evaluate", str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), "--no-progress"], capsys)
    assert "could not download" in err and "--inception-weights PATH" in err
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_bad_weights_files(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", np.zeros((2, 8, 8, 3), np.uint8))
    samples = str(tmp_path / "s.npz")
    err = run_cli(["evaluate", samples, samples, "--inception-weights", str(tmp_path / "missing.pth")], capsys)
    assert "Inception weights not found" in err
    state = random_inception_state_dict()
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    err = run_cli(["evaluate", samples, samples, "--inception-weights", str(tmp_path / "partial.pth")], capsys)
    assert "not the FID Inception-v3" in err and "Mixed_7c.branch_pool.conv.weight" in err
    (tmp_path / "garbage.pth").write_bytes(b"garbage")
    err = run_cli(["evaluate", samples, samples, "--inception-weights", str(tmp_path / "garbage.pth")], capsys)
    assert "cannot read Inception weights" in err


def test_bad_flags(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", np.zeros((2, 8, 8, 3), np.uint8))
    samples = str(tmp_path / "s.npz")
    assert "--batch-size must be >= 1" in run_cli(["evaluate", samples, samples, "--batch-size", "0"], capsys)
    assert "--pr-subset must be >= 0" in run_cli(["evaluate", samples, samples, "--pr-subset", "-1"], capsys)
    assert "unknown device" in run_cli(["evaluate", samples, samples, "--device", "tpu9"], capsys)


def test_cli_help_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    assert "--make-ref" in capsys.readouterr().out


def make_ref_refused(tmp_path, capsys, samples, ref):
    """--make-ref must refuse before any network or Inception: no weights are available here."""
    return run_cli(["evaluate", "--make-ref", str(samples), str(ref), "--no-progress"], capsys)


def test_make_ref_never_overwrites_its_input_or_an_image_batch(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    samples, images = tmp_path / "s.npz", tmp_path / "images.npz"
    np.savez(samples, np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(images, np.full((2, 8, 8, 3), 7, np.uint8))
    (tmp_path / "link.npz").symlink_to(samples)
    originals = {path: path.read_bytes() for path in (samples, images)}
    own_input = "write over its own input"
    assert own_input in make_ref_refused(tmp_path, capsys, samples, samples)
    assert own_input in make_ref_refused(tmp_path, capsys, samples, tmp_path / "sub" / ".." / "s.npz")
    assert own_input in make_ref_refused(tmp_path, capsys, samples, tmp_path / "link.npz")
    assert own_input in make_ref_refused(tmp_path, capsys, samples, tmp_path / "s")  # ".npz" is appended
    err = make_ref_refused(tmp_path, capsys, samples, images)
    assert "refusing to overwrite" in err and "images.npz" in err and "not a statistics file written by fastdit" in err
    (tmp_path / "folder.npz").mkdir()
    assert "is a folder" in make_ref_refused(tmp_path, capsys, samples, tmp_path / "folder.npz")
    assert {path: path.read_bytes() for path in originals} == originals


def test_make_ref_output_in_an_unwritable_place(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "a_file").write_text("not a folder")
    err = make_ref_refused(tmp_path, capsys, tmp_path / "s.npz", tmp_path / "a_file" / "ref.npz")
    assert "cannot write into" in err


def test_out_json_is_checked_before_inception(tmp_path, capsys):
    # No weights in the cache: reaching the network would report a download error instead.
    np.savez(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "a_file").write_text("not a folder")
    samples = str(tmp_path / "s.npz")
    err = run_cli(["evaluate", samples, samples, "--out-json", str(tmp_path / "a_file" / "m.json")], capsys)
    assert "cannot write into" in err and "a_file" in err
    (tmp_path / "m.json").mkdir()
    assert "is a folder" in run_cli(["evaluate", samples, samples, "--out-json", str(tmp_path / "m.json")], capsys)


def test_gray_npz_batches_are_read_as_rgb_and_only_nchw_is_told_to_transpose(tmp_path):
    """fastdit's rule for gray images (`fastdit.image_grid.as_rgb`): the channel repeated. A gray batch
    (the digits demo's samples.npz before it wrote RGB, anyone's np.savez of gray images) is read so,
    streamed and whole (Fortran order) alike, and the message about NCHW arrays is kept for those."""
    gray = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4, 1)
    for name, array in (("c.npz", gray), ("f.npz", np.asfortranarray(gray))):
        np.savez(tmp_path / name, array, np.arange(2))
        source = open_images(tmp_path / name)
        (batch,) = list(source.batches(8))
        assert source.image_size == (5, 4) and batch.shape == (2, 5, 4, 3)
        assert (batch == gray).all()  # every channel is the gray one
    np.savez(tmp_path / "two.npz", np.zeros((2, 8, 8, 2), np.uint8))
    with pytest.raises(UserError, match=r"shape \(2, 8, 8, 2\); expected N x H x W x 3.*or gray N x H x W x 1$"):
        open_images(tmp_path / "two.npz")
    np.savez(tmp_path / "nchw.npz", np.zeros((2, 1, 8, 8), np.uint8))
    with pytest.raises(UserError, match=r"transpose NCHW arrays"):
        open_images(tmp_path / "nchw.npz")


def test_evaluate_takes_the_digits_demos_samples(tmp_path):
    """The demo's samples.npz, written by its own writer, is RGB as sample-ddp's is, and evaluates."""
    from fastdit.demo.run import _save_samples

    digits = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    path = _save_samples(digits, np.arange(6), tmp_path / "samples.npz")
    with np.load(path) as data:
        assert data["arr_0"].shape == (6, 8, 8, 3) and (data["arr_0"] == digits).all()
    (batch,) = list(open_images(path).batches(8))
    assert (batch == digits).all()


def test_a_reference_folder_of_mixed_sizes_is_centre_cropped_to_the_samples_side(tmp_path, monkeypatch, capsys):
    """`fastdit evaluate my-samples.npz my-photos/`: a folder of photos of any sizes is the reference, each
    ADM-centre-cropped to the samples' side (with a note); the pixels are exactly those of
    `data.image_folder.center_crop`, and an image already of that size is kept as it is."""
    from fastdit.data.image_folder import center_crop

    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    arrays = {"a.png": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
              "b.png": rng.integers(0, 256, (40, 23, 3), dtype=np.uint8),
              "c.png": rng.integers(0, 256, (17, 61, 3), dtype=np.uint8)}
    for name, array in arrays.items():
        Image.fromarray(array).save(tmp_path / "photos" / name)
    images = open_images(tmp_path / "photos", crop_to=16)
    (batch,) = list(images.batches(8))
    assert images.image_size == (16, 16) and batch.shape == (3, 16, 16, 3)
    assert np.array_equal(batch[0], arrays["a.png"])  # already 16x16: untouched
    for index, name in ((1, "b.png"), (2, "c.png")):
        assert np.array_equal(batch[index], np.asarray(center_crop(Image.fromarray(arrays[name]), 16)))

    # Through the CLI: the note, then statistics of the cropped images (random Inception weights stand in)
    np.savez(tmp_path / "samples.npz", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    cache = tmp_path / "cache"
    (cache / "inception").mkdir(parents=True)
    torch.save(random_inception_state_dict(seed=0), cache / "inception" / "pt_inception-2015-12-05-6726825d.pth")
    monkeypatch.setenv("FASTDIT_CACHE", str(cache))
    assert main(["evaluate", str(tmp_path / "samples.npz"), str(tmp_path / "photos"), "--no-progress",
                 "--metrics", "fid", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "are 16x16, 61x17, 23x40, not all 16x16 as the samples: each is centre-cropped to 16x16" in out
    assert "reference: " in out and "(3 images)" in out
