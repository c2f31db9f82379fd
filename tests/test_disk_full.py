"""A full disk in every writer: one line at the CLI with exit status 2, what was there before stays
intact, no temporary is left, and the same command continues once there is space again."""

import fnmatch
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder
from fastdit.checkpoint import export_weights
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.cli import main
from fastdit.io import is_temporary
from fastdit.models import build_model
from test_train import TINY

DEV_FULL = Path("/dev/full")  # every write to it fails with ENOSPC, from the kernel itself
pytestmark = pytest.mark.skipif(not DEV_FULL.is_char_device(), reason="needs /dev/full (Linux)")


@pytest.fixture
def full_disk(monkeypatch):
    """`full_disk.names.append("*.pt")`: every atomic write of a file whose name matches meets a full
    disk. Its temporary becomes a link to /dev/full, so torch, numpy, PIL and plain writes get the
    kernel's ENOSPC through their own error handling. safetensors writes through a temporary of its
    own and renames it over ours, so there the library's own full-disk error is raised (the text
    safetensors 0.8 gives on a full tmpfs)."""
    from safetensors import SafetensorError
    import safetensors.torch

    real_mkstemp, real_save_file = tempfile.mkstemp, safetensors.torch.save_file

    class FullDisk:
        names: list[str] = []

    def mkstemp(*args, prefix="", **kwargs):
        fd, name = real_mkstemp(*args, prefix=prefix, **kwargs)
        final = prefix[1:-1]  # atomic_path names its temporary ".<final name>.<random>.tmp"
        if any(fnmatch.fnmatch(final, pattern) for pattern in FullDisk.names):
            os.unlink(name)
            os.symlink(DEV_FULL, name)
        return fd, name

    def save_file(tensors, filename, metadata=None):
        if os.path.islink(filename) and Path(os.readlink(filename)) == DEV_FULL:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return FullDisk


def cli_error(capsys, *argv) -> str:
    """The command's stderr; it must be one line and exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "no space left on the device" in err and " free in " in err, err
    return err


def snapshot(folder: Path) -> dict:
    """name -> sha256 of every file under `folder` (temporaries included, so leftovers show)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if is_temporary(p)]


# ------------------------------------------------------------------------------------------------
# train: the checkpoint and its export
# ------------------------------------------------------------------------------------------------


def train_cli(tmp_path, max_steps):
    return ["train", *TINY, "--results-dir", str(tmp_path), "--run-name", "run", "--max-steps", str(max_steps),
            "--ckpt-every", "2"]


@pytest.mark.parametrize("full_file", ["0000004.pt", "0000004-ema.safetensors"])
def test_train_checkpoint_or_export(tmp_path, capsys, full_disk, full_file):
    assert main(train_cli(tmp_path, 2)) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    before = snapshot(checkpoints)
    full_disk.names.append(full_file)
    err = cli_error(capsys, *train_cli(tmp_path, 4))
    assert "could not save the checkpoint of step 4" in err and "0000002.pt is intact" in err
    # Both or neither: the export's failure takes the new checkpoint with it.
    assert snapshot(checkpoints) == before
    assert temporaries(tmp_path) == []
    full_disk.names.clear()  # space again: the same command resumes from step 2 and finishes
    assert main(train_cli(tmp_path, 4)) == 0
    assert sorted(p.name for p in checkpoints.iterdir() if "0000004" in p.name) == ["0000004-ema.safetensors", "0000004.pt"]


def test_train_metrics_log(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(DEV_FULL)  # the log is appended to, not replaced
    err = cli_error(capsys, *train_cli(tmp_path, 2))
    assert "metrics.jsonl" in err


# ------------------------------------------------------------------------------------------------
# extract, sample-ddp, sample
# ------------------------------------------------------------------------------------------------


def test_extract_shard(tmp_path, capsys, full_disk, tiny_vae):
    images = make_image_folder(tmp_path / "images")  # 12 images: shards of 5, 5 and 2
    store = tmp_path / "store"
    argv = ["extract", "--data-path", str(images), "--features-path", str(store), "--image-size", "16",
            "--vae", tiny_vae, "--batch-size", "2", "--shard-size", "5", "--num-workers", "0", "--no-progress"]
    full_disk.names.append("shard-00001.safetensors")
    err = cli_error(capsys, *argv)
    assert "shard-00001.safetensors" in err
    assert not (store / "shard-00001.safetensors").exists() and temporaries(store) == []
    written = snapshot(store)
    full_disk.names.clear()
    assert main(argv) == 0
    assert all(snapshot(store)[name] == digest for name, digest in written.items())  # kept, not rewritten


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=1, num_classes=4)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None)), path)
    return str(path)


@pytest.mark.parametrize("full_file", ["chunk-00000004-00000008.npz", "samples.npz"])
def test_sample_ddp_chunk_or_assembly(tmp_path, capsys, full_disk, tiny_ckpt, full_file):
    out = tmp_path / "samples.npz"
    argv = ["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), "--num-fid-samples", "10", "--chunk-size", "4",
            "--num-sampling-steps", "2", "--cfg-scale", "1", "--device", "cpu", "--no-progress"]
    full_disk.names.append(full_file)
    err = cli_error(capsys, *argv)
    assert full_file in err
    assert not out.exists() and temporaries(tmp_path) == []
    finished_chunks = snapshot(tmp_path / "samples.parts")
    full_disk.names.clear()
    assert main(argv) == 0 and out.is_file()
    if full_file == "samples.npz":  # every chunk was kept: the rerun only assembles
        assert len([name for name in finished_chunks if name.startswith("chunk-")]) == 3


def test_sample_png(tmp_path, capsys, full_disk, tiny_ckpt):
    out = tmp_path / "grid.png"
    argv = ["sample", "--ckpt", tiny_ckpt, "--class-labels", "0", "1", "--num-sampling-steps", "2",
            "--cfg-scale", "1", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    before = out.read_bytes()
    full_disk.names.append("grid.png")
    err = cli_error(capsys, *argv, "--seed", "1")
    assert "grid.png" in err
    assert out.read_bytes() == before and temporaries(tmp_path) == []
