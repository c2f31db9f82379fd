"""`fastdit sample-ddp`: the same .npz from 1 or 2 processes, after a kill or a damaged chunk, one run per
output at a time, and as ADM's evaluator reads it."""

import hashlib
import os
import signal
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdit.sampling.indexed as label_rule
from fastdit.checkpoint import export_weights, load_model
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.cli import main
from fastdit.latents import PixelSpace
from fastdit.models import build_model
from fastdit.run_folder import exclusive_lock
from fastdit.sample_ddp import write_adm_npz
from fastdit.sample_ddp.workdir import PNG_DIR_MARKER
from fastdit.sampling import SamplingOptions, generate
from fastdit.sampling.indexed import labels_for

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES, NUM_CLASSES = 10, 4
# 10 images in chunks of 4 (the last one of 2); 3 DDPM steps with guidance: a second per run on a CPU.
RUN = ["--num-fid-samples", str(NUM_IMAGES), "--chunk-size", "4", "--num-sampling-steps", "3", "--cfg-scale", "1.5",
       "--seed", "7", "--device", "cpu", "--no-progress"]
BATCH = 3  # the reference's batch size: the same bytes are promised only for the same batch (and chunk) size


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=1, num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None)), path)
    return str(path)


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory) -> Path:
    """One process, in this process, batches of 3: the file every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "samples.npz"
    assert main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), "--batch-size", str(BATCH), *RUN]) == 0
    return out


def torchrun_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------------------------------------
# labels and the .npz writer
# ------------------------------------------------------------------------------------------------


def test_labels_depend_only_on_seed_and_index():
    whole = labels_for(range(100), seed=3, num_classes=10)
    pieces = np.concatenate([labels_for(range(a, min(a + 7, 100)), seed=3, num_classes=10) for a in range(0, 100, 7)])
    assert np.array_equal(whole, pieces) and whole.dtype == np.int64
    assert not np.array_equal(whole, labels_for(range(100), seed=4, num_classes=10))
    assert labels_for(range(5), seed=0, num_classes=3, class_labels=[2, 0]).tolist() == [2, 0, 2, 0, 2]


def test_labels_follow_the_documented_rule():
    """The rule is part of the output format: recomputed here from the docstring of `fastdit.sampling.indexed`
    (numpy's SeedSequence over crc32 of the stream name, seed and index; Lemire's multiply-shift), and pinned."""
    def documented(seed, index, classes):
        h = int(np.random.SeedSequence([zlib.crc32(b"image-label"), seed, index]).generate_state(1, np.uint64)[0])
        return h * classes >> 64

    assert labels_for(range(6), seed=0, num_classes=1000).tolist() == [documented(0, i, 1000) for i in range(6)]
    assert labels_for(range(6), seed=0, num_classes=1000).tolist() == [719, 82, 773, 97, 216, 62]


def test_label_rule_cuts_the_hash_range_into_equal_parts(monkeypatch):
    """Multiply-shift sends K equal parts of [0, 2^64) to the K classes: hashes at the midpoints of N equal
    cells (N a multiple of K) must give every class exactly N/K images. A modulo or a truncated shift would not."""
    cells, classes = 1200, 12
    monkeypatch.setattr(label_rule, "derive_seed", lambda stream, seed, index: (2 * index + 1) * 2**64 // (2 * cells))
    counts = np.bincount(labels_for(range(cells), seed=0, num_classes=classes), minlength=classes)
    assert counts.tolist() == [cells // classes] * classes


def test_streamed_npz_reads_like_np_savez(tmp_path):
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), np.arange(n) + 10 * k) for k, n in enumerate([3, 1, 2])]
    write_adm_npz(tmp_path / "a.npz", iter(parts), count=6, image_shape=(4, 4, 3))
    np.savez(tmp_path / "b.npz", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a.files == b.files == ["arr_0", "arr_1"]
    for key in a.files:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key])
    # The same parts give the same bytes (no timestamps in the file).
    write_adm_npz(tmp_path / "c.npz", iter(parts), count=6, image_shape=(4, 4, 3))
    assert sha256(tmp_path / "a.npz") == sha256(tmp_path / "c.npz")


def test_streamed_npz_refuses_a_wrong_count_and_leaves_nothing(tmp_path):
    parts = [(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2))]
    with pytest.raises(ValueError, match="2 rows"):
        write_adm_npz(tmp_path / "a.npz", iter(parts), count=3, image_shape=(4, 4, 3))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def test_output_opens_as_the_adm_evaluator_reads_it(reference, tiny_ckpt):
    images = np.load(reference)["arr_0"]  # how ADM's evaluator.py reads samples
    labels = np.load(reference)["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (NUM_IMAGES, 8, 8, 3)
    assert labels.dtype == np.int64 and labels.tolist() == labels_for(range(NUM_IMAGES), seed=7, num_classes=NUM_CLASSES).tolist()
    # Image i is what `generate` gives for index i, in the batches sample-ddp uses (they start at chunk
    # boundaries: [0, 3) [3, 4) | [4, 7) [7, 8) | [8, 10)), so the same arithmetic: bit for bit.
    model, info = load_model(tiny_ckpt)
    options = SamplingOptions(num_steps=3, cfg_scale=1.5)
    batches = [range(0, 3), range(3, 4), range(4, 7), range(7, 8), range(8, 10)]
    expected = np.concatenate([generate(model, PixelSpace(3), labels[b.start:b.stop], options=options, objective=info.objective, seed=7, indices=b)
                               for b in batches])
    assert np.array_equal(images, expected)
    # ADM's evaluator can also stream arr_0 out of the zip: a plain .npy entry, C order, uint8.
    with zipfile.ZipFile(reference) as archive, archive.open("arr_0.npy") as entry:
        assert np.lib.format.read_magic(entry) == (1, 0)
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(entry)
        assert (shape, fortran_order, dtype) == (images.shape, False, np.uint8)
        assert entry.read() == images.tobytes()
    assert not reference.with_suffix(".parts").exists()  # chunks are dropped once assembled
    assert reference.with_suffix(".json").exists()


def test_two_processes_write_the_same_file_as_one(reference, tiny_ckpt, tmp_path):
    out = tmp_path / "two.npz"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "fastdit", "sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), "--batch-size", str(BATCH), *RUN]
    result = subprocess.run([*command, "--png-dir", str(tmp_path / "png")],
                            env=torchrun_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1 and "on 2 process(es)" in result.stdout, result.stdout  # rank 0 only
    # Other process count, same batch size: byte for byte the same file.
    assert sha256(out) == sha256(reference)
    images = np.load(out)["arr_0"]
    pngs = sorted(path for path in (tmp_path / "png").iterdir() if path.suffix == ".png")
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(NUM_IMAGES)]
    assert [p.name for p in (tmp_path / "png").iterdir() if p.suffix != ".png"] == [PNG_DIR_MARKER]
    assert all(np.array_equal(np.asarray(Image.open(p)), image) for p, image in zip(pngs, images))

    # Another process holds the output (rank 0 refuses it like other settings, through the same broadcast):
    # one clean error line from rank 0, rank 1 leaves without hanging or a traceback, the file untouched.
    with exclusive_lock(out.with_suffix(".parts"), "a test holding the lock"):
        result = subprocess.run(command, env=torchrun_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert result.stderr.count("fastdit sample-ddp: error:") == 1 and "is in use by a test holding the lock" in result.stderr, \
        result.stderr[-3000:]
    assert "[rank1]" not in result.stderr, result.stderr[-3000:]
    assert sha256(out) == sha256(reference)


KILL_AFTER_FIRST_CHUNK = """
import sys, time
import fastdit.sample_ddp.workdir as workdir
write_chunk = workdir.write_chunk
def write_then_hang(*args, **kwargs):  # the first chunk lands on disk, then we wait for SIGKILL
    write_chunk(*args, **kwargs)
    time.sleep(600)
workdir.write_chunk = write_then_hang
from fastdit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_then_kill_after_first_chunk(command, cwd, while_running=lambda process: None) -> None:
    """Run `fastdit <command>` in a child process, call `while_running(process)` once its first chunk is
    on disk, then SIGKILL it."""
    first_chunk = Path(command[command.index("--out") + 1]).with_suffix(".parts") / "chunk-00000000-00000004.npz"
    process = subprocess.Popen([sys.executable, "-c", KILL_AFTER_FIRST_CHUNK, *command], env=torchrun_env(), cwd=cwd)
    try:
        deadline = time.monotonic() + 120
        while not first_chunk.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before writing a chunk"
            time.sleep(0.1)
        while_running(process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_killed_run_continues_to_the_same_file(reference, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "killed.npz"
    command = ["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), "--batch-size", str(BATCH), *RUN]
    parts = out.with_suffix(".parts")
    start_then_kill_after_first_chunk(command, tmp_path)
    assert not out.exists()
    (parts / ".chunk-00000004-00000008.npz.abc123.tmp").write_bytes(b"PK\x03")  # as if killed mid-write

    with pytest.raises(SystemExit) as exit_info:  # another seed must not be mixed in
        main([*command, "--seed", "8"])
    assert exit_info.value.code == 2
    assert "was started with other settings (seed: 7 -> 8)" in capsys.readouterr().err

    stale = tmp_path / ".killed.npz.x1y2z3.tmp"  # as if killed while assembling
    stale.write_bytes(b"PK\x03")

    # --png-dir is not a setting: the rerun also writes the PNGs of the chunk sampled before the kill.
    assert main([*command, "--png-dir", str(tmp_path / "png")]) == 0
    assert "sampled 6 now" in capsys.readouterr().out  # 10 images, 4 were on disk
    assert sha256(out) == sha256(reference)
    assert not parts.exists() and not stale.exists()
    images = np.load(out)["arr_0"]
    assert all(np.array_equal(np.asarray(Image.open(tmp_path / "png" / f"{i:06d}.png")), images[i]) for i in range(NUM_IMAGES))


def test_a_second_run_on_the_same_output_stops_and_a_damaged_chunk_is_sampled_again(reference, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "busy.npz"
    command = ["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), "--batch-size", str(BATCH), *RUN]
    first_chunk = out.with_suffix(".parts") / "chunk-00000000-00000004.npz"

    def second_run(process):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"is in use by fastdit sample-ddp (pid {process.pid} on " in err and "Traceback" not in err, err

    start_then_kill_after_first_chunk(command, tmp_path, second_run)
    first_chunk.write_bytes(first_chunk.read_bytes()[:300])  # cut short, e.g. by a copy

    assert main(command) == 0
    captured = capsys.readouterr()
    assert f"warning: chunk {str(first_chunk)!r} is damaged" in captured.err
    assert "sampled 10 now" in captured.out
    assert sha256(out) == sha256(reference)


def _other_arrays(path):
    with open(path, "wb") as handle:
        np.savez(handle, arr_0=np.zeros((4, 8, 8, 3), np.uint8))


def _too_few_images(path):
    with open(path, "wb") as handle:
        np.savez(handle, images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.zeros(3, np.int64))


def _flipped_byte(path):  # inside the images: only the zip's CRC-32 tells
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    (lambda path: path.write_bytes(b"not a zip at all"), "not a zip archive"),
    (_other_arrays, "holds arr_0 uint8 (4, 8, 8, 3), not images uint8 (4, 8, 8, 3), labels int64 (4,)"),
    (_too_few_images, "holds images uint8 (3, 8, 8, 3), labels int64 (3,), not images uint8 (4, 8, 8, 3)"),
    (_flipped_byte, "unreadable: BadZipFile: Bad CRC-32 for file 'images.npy'"),
])
def test_damaged_chunks_are_resampled_on_resume(reference, tiny_ckpt, tmp_path, monkeypatch, capsys, damage, problem):
    import fastdit.sample_ddp.runner as runner

    out = tmp_path / "damaged.npz"
    command = ["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), "--batch-size", str(BATCH), *RUN]
    with monkeypatch.context() as patch:  # every chunk on disk, no result: as a run stopped while assembling
        patch.setattr(runner, "write_adm_npz", lambda *args, **kwargs: sys.exit(1))
        with pytest.raises(SystemExit):
            main(command)
    chunk = out.with_suffix(".parts") / "chunk-00000004-00000008.npz"
    damage(chunk)
    assert main(command) == 0
    captured = capsys.readouterr()
    assert f"warning: chunk {str(chunk)!r} is damaged ({problem}" in captured.err, captured.err
    assert "sampled 4 now" in captured.out
    assert sha256(out) == sha256(reference)


def test_another_batch_size_gives_the_same_images_up_to_rounding(reference, tiny_ckpt, tmp_path):
    """Not promised bit for bit: a matrix product over 4 rows may round differently from one over 3.
    float32 rounding (~1e-7 relative per operation, through one block and 3 steps) stays far below one
    uint8 level (2/255 in [-1, 1]), so a pixel can at most cross one rounding boundary: |difference| <= 1."""
    out = tmp_path / "batch4.npz"
    assert main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), "--batch-size", "4", *RUN]) == 0
    with np.load(out) as got, np.load(reference) as want:
        assert np.array_equal(got["arr_1"], want["arr_1"])
        assert np.abs(got["arr_0"].astype(int) - want["arr_0"].astype(int)).max() <= 1


def test_rerun_of_a_finished_output_does_nothing_and_other_settings_are_refused(reference, tiny_ckpt, capsys):
    before = sha256(reference)
    assert main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(reference), "--batch-size", "5", *RUN]) == 0
    assert "nothing to do" in capsys.readouterr().out and sha256(reference) == before
    with pytest.raises(SystemExit) as exit_info:
        main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(reference), *RUN, "--num-fid-samples", "12"])
    assert exit_info.value.code == 2
    assert "already written with other settings (num_samples: 10 -> 12)" in capsys.readouterr().err
    assert sha256(reference) == before


def test_given_class_labels_are_cycled(tiny_ckpt, tmp_path):
    out = tmp_path / "given.npz"
    run = [a if a != str(NUM_IMAGES) else "5" for a in RUN]
    assert main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), "--class-labels", "3", "1", *run]) == 0
    assert np.load(out)["arr_1"].tolist() == [3, 1, 3, 1, 3]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-fid-samples", "0"], "--num-fid-samples must be a positive integer, got 0"),
        (["--num-fid-samples", "-5"], "--num-fid-samples must be a positive integer, got -5"),
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--chunk-size", "-1"], "--chunk-size must be a positive integer, got -1"),
        (["--out", "samples.png"], "should end in .npz"),
        (["--class-labels", "4"], "class label 4 is outside [0, 4)"),
        (["--cfg-scale", "nan"], "argument --cfg-scale: 'nan' is not a finite number"),
        (["--cfg-scale", "inf"], "argument --cfg-scale: 'inf' is not a finite number"),
        (["--seed", "-1"], "argument --seed: -1 is negative"),
    ],
)
def test_bad_arguments_are_one_line_errors(tiny_ckpt, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(tmp_path / "s.npz"), *RUN, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == []  # no result, and no work folder left behind by the lock


def test_output_that_is_not_ours_is_refused(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s.npz"
    np.savez(out, np.zeros((1, 8, 8, 3), np.uint8))
    before = sha256(out)
    with pytest.raises(SystemExit):
        main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), *RUN])
    assert "was not written by `fastdit sample-ddp`" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [out] and sha256(out) == before


def test_a_folder_of_other_files_in_place_of_the_work_folder_is_refused(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s.npz"
    theirs = out.with_suffix(".parts") / "notes.txt"
    theirs.parent.mkdir()
    theirs.write_text("mine")
    with pytest.raises(SystemExit):
        main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), *RUN])
    assert "exists but was not written by `fastdit sample-ddp`" in capsys.readouterr().err
    assert theirs.read_text() == "mine" and not out.exists()


def test_a_png_dir_of_other_files_is_refused_and_ours_is_reused(tiny_ckpt, tmp_path, capsys):
    # Issue #18, item 5.8: --png-dir wrote 000000.png ... over whatever a folder it did not make held.
    png_dir = tmp_path / "photos"
    png_dir.mkdir()
    theirs = png_dir / "000000.png"
    theirs.write_bytes(b"my own picture")
    out = tmp_path / "s.npz"
    command = ["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), *RUN]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--png-dir", str(png_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--png-dir" in err and "holds other files (000000.png)" in err and "Traceback" not in err
    assert theirs.read_bytes() == b"my own picture" and sorted(png_dir.iterdir()) == [theirs]
    assert not out.exists()

    # A folder sample-ddp made for this output is its own: a rerun may write there again.
    ours = tmp_path / "png"
    assert main([*command, "--png-dir", str(ours)]) == 0
    first = (ours / "000003.png").read_bytes()
    (ours / "000003.png").unlink()
    out.unlink()  # sample again into the same output and PNG folder: allowed, and it fills the folder
    assert main([*command, "--png-dir", str(ours)]) == 0
    assert (ours / "000003.png").read_bytes() == first
    capsys.readouterr()
    # ... but another output's PNG folder is not.
    with pytest.raises(SystemExit):
        main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(tmp_path / "other.npz"), *RUN, "--png-dir", str(ours)])
    assert "holds the PNGs of another output" in capsys.readouterr().err
    assert not (tmp_path / "other.npz").exists()


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample-ddp", "--help"])
    assert exit_info.value.code == 0 and "--num-fid-samples" in capsys.readouterr().out


def test_gray_pixel_model_writes_rgb(tmp_path):
    """ADM's evaluator takes RGB: a one-channel pixel model's images are repeated over three channels."""
    model = build_model("DiT-T/2", input_size=8, in_channels=1, depth=1, num_classes=2)
    ckpt = tmp_path / "gray.safetensors"
    export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None)), ckpt)
    out = tmp_path / "gray.npz"
    assert main(["sample-ddp", "--ckpt", str(ckpt), "--out", str(out), *RUN, "--num-fid-samples", "2"]) == 0
    images = np.load(out)["arr_0"]
    assert images.shape == (2, 8, 8, 3) and (images == images[..., :1]).all()


def test_run_stopped_while_assembling_only_assembles_again(reference, tiny_ckpt, tmp_path, monkeypatch, capsys):
    import fastdit.sample_ddp.runner as runner

    out = tmp_path / "late.npz"
    command = ["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), "--batch-size", str(BATCH), *RUN]

    def crash(*args, **kwargs):
        raise RuntimeError("stopped while assembling")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "write_adm_npz", crash)
        with pytest.raises(RuntimeError, match="assembling"):
            main(command)
    assert not out.exists() and len(list(out.with_suffix(".parts").glob("chunk-*.npz"))) == 3
    assert main(command) == 0
    assert "sampled 0 now (on 1 process(es))" in capsys.readouterr().out
    assert sha256(out) == sha256(reference)


def test_a_work_folder_of_a_ddpm_model_from_before_objectives_resumes(reference, tiny_ckpt, tmp_path, monkeypatch,
                                                                        capsys):
    # Before objectives were objects, a DDPM model's settings recorded the flow's settings at their
    # defaults beside its name; such a folder holds the same images and resumes.
    import json

    import fastdit.sample_ddp.runner as runner

    out = tmp_path / "old.npz"
    command = ["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), "--batch-size", str(BATCH), *RUN]
    with monkeypatch.context() as patch:
        patch.setattr(runner, "write_adm_npz", lambda *args, **kwargs: sys.exit(1))
        with pytest.raises(SystemExit):
            main(command)
    settings_path = out.with_suffix(".parts") / "settings.json"
    settings = json.loads(settings_path.read_text())
    assert settings["model"]["process"] == {"objective": "ddpm"}
    settings["model"]["process"] = {"objective": "ddpm", "time_sampling": "uniform", "logit_normal_mean": 0.0,
                                    "logit_normal_std": 1.0}
    settings_path.write_text(json.dumps(settings))
    capsys.readouterr()
    assert main(command) == 0
    assert "sampled 0 now (on 1 process(es))" in capsys.readouterr().out
    assert sha256(out) == sha256(reference)
    # A record of another objective is not the same model: refused, as before.
    settings["model"]["process"] = {"objective": "flow"}
    out.unlink()
    (out.with_suffix(".json")).unlink()
    with monkeypatch.context() as patch:
        patch.setattr(runner, "write_adm_npz", lambda *args, **kwargs: sys.exit(1))
        with pytest.raises(SystemExit):
            main(command)
    settings_path.write_text(json.dumps(settings))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2
    assert 'model.process.objective: "flow" -> "ddpm"' in capsys.readouterr().err


def test_non_finite_samples_never_make_a_complete_npz(tmp_path, capsys):
    """A model whose output overflows float32 (finite weights: they pass the loader's check) used to give
    an all-zero .npz, marked complete, that an FID run would then measure. Now: exit 2, one line, no .npz
    and no finished chunk, so nothing of it can be taken for a result or resumed from."""
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=1, num_classes=NUM_CLASSES)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(3e38)
    ckpt = tmp_path / "overflowing.safetensors"
    export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None)), ckpt)
    out = tmp_path / "samples.npz"
    with pytest.raises(SystemExit) as exit_info:
        main(["sample-ddp", "--ckpt", str(ckpt), "--out", str(out), "--png-dir", str(tmp_path / "pngs"),
              "--batch-size", str(BATCH), *RUN])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "non-finite latents (NaN or inf) for 3 of 3 image(s) (indices 0, 1, 2); nothing is written" in err
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert list(tmp_path.glob("samples.parts/chunk-*")) == [] and list(tmp_path.glob("pngs/*.png")) == []


# ------------------------------------------------------------------------------------------------
# many processes: balanced shares, no collective while anyone samples
# ------------------------------------------------------------------------------------------------


def shares_of(pending, *, num_samples, chunk_size, batch_size, world_size):
    from fastdit.sample_ddp import shares
    from fastdit.sample_ddp.workdir import Chunk

    gaps = [Chunk(a, b) for a, b in pending] if pending is not None else [Chunk(0, num_samples)]
    units = shares.batch_units(gaps, chunk_size=chunk_size, batch_size=batch_size)
    return units, [shares.pieces(share, chunk_size) for share in shares.deal(units, world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 8, 13, 50, 64, 100])
def test_every_process_gets_within_one_batch_of_an_equal_share(world_size):
    """50,000 images in chunks of 1000, batches of 32: with 8 processes round-robin chunks gave 7 and
    6 chunks (a whole chunk's wait), with 64 left 14 processes idle; now every share is within one
    batch of N / W, the pieces cover the images once in order, and none crosses a chunk boundary."""
    units, dealt = shares_of(None, num_samples=50_000, chunk_size=1000, batch_size=32, world_size=world_size)
    sizes = [sum(len(piece) for piece, _ in share) for share in dealt]
    assert all(abs(size - 50_000 / world_size) < 32 for size in sizes), sizes
    files = [piece for share in dealt for piece, _ in share]
    assert [(f.start, f.stop) for f in files] == sorted((f.start, f.stop) for f in files)
    assert files[0].start == 0 and files[-1].stop == 50_000 and all(a.stop == b.start for a, b in zip(files, files[1:]))
    assert all(f.start // 1000 == (f.stop - 1) // 1000 for f in files)
    # The batches are the grid one process samples: they start at chunk starts, every 32 images.
    assert units[:33] == [type(units[0])(s, min(s + 32, 1000)) for s in range(0, 1000, 32)] + [type(units[0])(1000, 1032)]
    assert all(unit.start % 1000 % 32 == 0 for unit in units)


def test_a_rerun_after_a_kill_deals_what_is_missing_as_evenly():
    """8 processes killed mid-run left each its first pieces; a rerun on 8 (or 5) deals only the rest,
    within one batch of an equal share, on the same batch grid."""
    _, dealt = shares_of(None, num_samples=50_000, chunk_size=1000, batch_size=32, world_size=8)
    done = [share[0][0] for share in dealt]  # each process wrote its first file, then the job was killed
    holes, start = [], 0
    for chunk in sorted(done):
        if chunk.start > start:
            holes.append((start, chunk.start))
        start = chunk.stop
    holes.append((start, 50_000))
    missing = sum(b - a for a, b in holes)
    for world_size in (8, 5):
        units, again = shares_of(holes, num_samples=50_000, chunk_size=1000, batch_size=32, world_size=world_size)
        sizes = [sum(len(piece) for piece, _ in share) for share in again]
        assert sum(sizes) == missing and all(abs(size - missing / world_size) < 32 for size in sizes), sizes
        assert all(unit.start % 1000 % 32 == 0 for unit in units)  # the pieces on disk ended on the grid too


SLOW_RANK_ONE = """
import datetime, os, sys, time
import torch.distributed
join = torch.distributed.init_process_group
def with_short_timeout(*args, **kwargs):  # a collective that waits longer than this fails, as NCCL's watchdog would
    return join(*args, **{**kwargs, "timeout": datetime.timedelta(seconds=float(os.environ["GROUP_TIMEOUT"]))})
torch.distributed.init_process_group = with_short_timeout
import fastdit.sample_ddp.workdir as workdir
write_chunk, rank = workdir.write_chunk, int(os.environ["RANK"])
def slow_and_logged(paths, chunk, images, labels):
    if rank == 1:
        time.sleep(float(os.environ["SLOW_SECONDS"]))  # process 1 samples longer than the group's timeout
    write_chunk(paths, chunk, images, labels)
    print(f"rank {rank} wrote {chunk.start} {chunk.stop}", flush=True)
workdir.write_chunk = slow_and_logged
from fastdit import distributed
from fastdit.cli import main
distributed.leave_job_now(main(sys.argv[1:]))
"""


def test_three_processes_share_a_count_that_does_not_divide_and_none_waits_in_a_collective(tiny_ckpt, tmp_path):
    """10 images in chunks of 4, batches of 1, on 3 gloo processes: shares of 4, 3 and 3 images (dealing
    chunks gave 4, 4 and 2), the same bytes as one process, and while process 1 samples 12 s longer than
    the process group's 8-s timeout the others wait on the shared folder, not in a collective."""
    one = tmp_path / "one.npz"
    run = ["--ckpt", tiny_ckpt, "--batch-size", "1", *RUN]
    assert main(["sample-ddp", "--out", str(one), *run]) == 0
    (tmp_path / "slow.py").write_text(SLOW_RANK_ONE)
    out = tmp_path / "three.npz"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"]
    result = subprocess.run([*torchrun, str(tmp_path / "slow.py"), "sample-ddp", "--out", str(out), *run],
                            env={**torchrun_env(), "GROUP_TIMEOUT": "8", "SLOW_SECONDS": "12", "OMP_NUM_THREADS": "1"},
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = [line.split() for line in result.stdout.splitlines() if line.startswith("rank ")]
    images = {rank: sum(int(stop) - int(start) for r, start, stop in ((w[1], w[3], w[4]) for w in written) if r == rank)
              for rank in "012"}
    assert images == {"0": 4, "1": 3, "2": 3}, written
    assert sorted((int(w[3]), int(w[4])) for w in written) == [(0, 4), (4, 7), (7, 8), (8, 10)]  # never across a chunk
    assert "sampled 10 now" in result.stdout and "on 3 process(es)" in result.stdout
    assert sha256(out) == sha256(one)


def test_chunk_files_that_do_not_fit_the_run_are_dropped_on_resume(tmp_path):
    """Files from another deal are kept when they fit the grid; one beyond the run's images, across a
    chunk boundary, or overlapping a kept one is deleted and its images sampled again."""
    from fastdit.sample_ddp.workdir import Chunk, OutputPaths, drop_damaged_chunks, pending, write_chunk

    paths = OutputPaths(tmp_path / "s.npz")
    paths.work_dir.mkdir()
    for start, stop in [(0, 3), (3, 4), (2, 4), (4, 7), (7, 9), (8, 12)]:
        n = stop - start
        write_chunk(paths, Chunk(start, stop), np.zeros((n, 8, 8, 3), np.uint8), np.zeros(n, np.int64))
    dropped = {path.name: why for path, why in drop_damaged_chunks(paths, 10, 4, (8, 8, 3))}
    assert dropped == {"chunk-00000002-00000004.npz": "it overlaps images held by another chunk file (up to 3)",
                       "chunk-00000007-00000009.npz": "it spans two chunks of 4 images",
                       "chunk-00000008-00000012.npz": "images 8 to 12 are not within the run's 10"}
    assert pending(paths, 10) == [Chunk(7, 10)]


def test_a_job_whose_images_cannot_fit_on_the_disk_is_refused_before_sampling(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import shutil

    from fastdit.sample_ddp import runner

    free = 1000  # bytes: fewer than the chunks and the .npz of RUN's images at 8x8x3 = 192 bytes each
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    monkeypatch.setattr(runner, "_sample_pieces", lambda *a, **k: pytest.fail("sampling started"))
    with pytest.raises(SystemExit) as exit_info:
        main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(tmp_path / "s.npz"), *RUN])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "images at 8 px (chunks, then the .npz) need about" in err
    assert "choose another --out or ask for fewer with --num-fid-samples" in err and "Traceback" not in err
