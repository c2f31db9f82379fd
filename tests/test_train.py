"""Training: resume after SIGKILL is bit-identical, options keep one code path, bad input is clear."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder
from fastdit.checkpoint import load_model
from fastdit.cli import main
from fastdit.errors import UserError
from fastdit.train.config import TrainConfig
from fastdit.train.loop import NonFiniteLoss, train

TINY = ["--data-path", "digits", "--model", "DiT-T/2", "--image-size", "8", "--num-classes", "10",
        "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--global-batch-size", "16",
        "--lr", "1e-3", "--ema-decay", "0.9", "--num-workers", "0", "--log-every", "1", "--no-progress",
        "--no-tensorboard"]


def tiny_config(results_dir, **overrides) -> TrainConfig:
    fields = dict(data_path="digits", model="DiT-T/2", image_size=8, num_classes=10, depth=2, hidden_size=64,
                  num_heads=2, global_batch_size=16, lr=1e-3, ema_decay=0.9, num_workers=0, log_every=1,
                  progress=False, tensorboard=False, results_dir=str(results_dir), max_steps=6, ckpt_every=2)
    fields.update(overrides)
    return TrainConfig(**fields)


def final_state(run_dir: Path) -> dict:
    newest = sorted((run_dir / "checkpoints").glob("*.pt"))[-1]
    return torch.load(newest, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigkill_and_rerun_gives_bit_identical_weights(tmp_path):
    reference = train(tiny_config(tmp_path / "reference", max_steps=8, ckpt_every=2))
    assert reference.step == 8

    command = [sys.executable, "-m", "fastdit", "train", *TINY, "--max-steps", "8", "--ckpt-every", "2",
               "--results-dir", str(tmp_path / "killed")]
    run_dir = tmp_path / "killed" / reference.run_dir.name
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "0000004.pt").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "checkpoints" / "0000008.pt").exists()

    subprocess.run(command, check=True, capture_output=True)
    resumed, uninterrupted = final_state(run_dir), final_state(reference.run_dir)
    assert resumed["position"] == uninterrupted["position"] == {"step": 8, "epoch": 0, "step_in_epoch": 8}
    assert_same_tensors(resumed["model"], uninterrupted["model"])
    assert_same_tensors(resumed["ema"], uninterrupted["ema"])
    for a, b in zip(resumed["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values()):
        assert_same_tensors(a, b)
    # No temporary files are left behind by the killed process's writes either.
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [] or all(p.endswith(".tmp") for p in leftovers)


def test_resume_across_epoch_boundary_matches(tmp_path):
    # 1,438 training digits / batch 512 -> 2 steps per epoch: checkpoints land on epoch ends.
    kwargs = dict(global_batch_size=512, max_steps=5, ckpt_every=2)
    reference = train(tiny_config(tmp_path / "a", **kwargs))
    train(tiny_config(tmp_path / "b", **{**kwargs, "max_steps": 3}))
    resumed = train(tiny_config(tmp_path / "b", **kwargs))
    assert resumed.step == 5
    assert final_state(resumed.run_dir)["position"] == {"step": 5, "epoch": 2, "step_in_epoch": 1}
    assert_same_tensors(final_state(resumed.run_dir)["ema"], final_state(reference.run_dir)["ema"])


def test_run_folder_contents_and_export_loads_in_sample(tmp_path):
    result = train(tiny_config(tmp_path, max_steps=4, ckpt_every=2, keep_last=1, tensorboard=True, sample_every=4, sample_steps=3))
    run = result.run_dir
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000004-ema.safetensors", "0000004.pt"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"loss", "steps_per_sec", "images_per_sec", "peak_memory_gb"} <= metrics[0].keys()
    assert list((run / "tensorboard").iterdir())
    assert (run / "samples" / "0000004.png").is_file()
    model, info = load_model(result.export)
    assert info.latent.kind == "pixels" and info.class_names == [str(d) for d in range(10)]
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(result.export), "--num-sampling-steps", "3", "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()


def test_micro_batches_and_checkpointing_give_the_same_training(tmp_path):
    plain = train(tiny_config(tmp_path / "plain", max_steps=2))
    accumulated = train(tiny_config(tmp_path / "acc", max_steps=2, micro_batch_size=4, gradient_checkpointing=True))
    a, b = final_state(plain.run_dir)["model"], final_state(accumulated.run_dir)["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    result = train(tiny_config(tmp_path, max_steps=3, precision=precision))
    state = final_state(result.run_dir)
    assert (state["scaler"] is not None) == (precision == "fp16")
    assert result.last_loss is not None and result.last_loss < 5


def test_image_folder_on_the_fly_and_latent_store(tmp_path, tiny_vae):
    images = make_image_folder(tmp_path / "images", per_class=6)
    common = dict(data_path=None, image_size=16, num_classes=3, global_batch_size=6, max_steps=2, vae=tiny_vae)
    on_the_fly = train(tiny_config(tmp_path / "r1", **{**common, "data_path": str(images)}))
    model, info = load_model(on_the_fly.export)
    assert info.latent.kind == "vae" and model.config.input_size == 2 and model.config.in_channels == 4
    store = tmp_path / "store"
    assert main(["extract", "--data-path", str(images), "--features-path", str(store), "--image-size", "16",
                 "--vae", tiny_vae, "--num-workers", "0", "--no-progress"]) == 0
    from_store = train(tiny_config(tmp_path / "r2", **{**common, "features_path": str(store), "vae": None}))
    assert from_store.step == 2
    with pytest.raises(UserError, match="holds 16px images, but this run asks for 32px"):
        train(tiny_config(tmp_path / "r3", **{**common, "features_path": str(store), "vae": None, "image_size": 32}))


def test_unconditional_single_class(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("only",), per_class=8)
    result = train(tiny_config(tmp_path, data_path=str(images), vae="pixels", image_size=8, num_classes=1,
                               class_dropout_prob=0.0, global_batch_size=4, max_steps=2))
    model, _ = load_model(result.export)
    assert model.y_embedder.embedding_table.num_embeddings == 1


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, max_steps=2, ckpt_every=2)
    train(config)
    before = final_state(config.run_dir())
    from fastdit.diffusion import GaussianDiffusion

    original = GaussianDiffusion.training_losses

    def poisoned(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        return {**losses, "loss": losses["loss"] * float("nan")}

    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 3.*last good checkpoint is intact"):
        train(tiny_config(tmp_path, max_steps=4, ckpt_every=2))
    assert_same_tensors(final_state(config.run_dir())["model"], before["model"])


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, max_steps=2, ckpt_every=2)
    train(config)
    import fastdit.train.state as state_module

    def full_disk(obj, path):
        Path(str(path) + ".partial").write_bytes(b"x")  # what a half-written temp file looks like
        Path(str(path) + ".partial").unlink()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_module, "atomic_torch_save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*0000002.pt is intact"):
        train(tiny_config(tmp_path, max_steps=4, ckpt_every=2))
    assert sorted(p.name for p in (config.run_dir() / "checkpoints").glob("*.pt")) == ["0000002.pt"]
    torch.load(config.run_dir() / "checkpoints" / "0000002.pt", weights_only=True)


def test_bad_input_messages(tmp_path, capsys):
    def cli(*extra):
        try:
            return main(["train", *TINY, "--results-dir", str(tmp_path / "runs"), "--max-steps", "1", *extra])
        except SystemExit as exit_:
            return exit_.code

    assert cli("--data-path", str(tmp_path / "nowhere"), "--vae", "pixels") == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli("--data-path", str(tmp_path / "empty"), "--vae", "pixels") == 2
    assert "empty" in capsys.readouterr().err
    assert cli("--precision", "fp8") == 2
    assert "unknown precision 'fp8'" in capsys.readouterr().err
    assert cli("--global-batch-size", "4000") == 2
    assert "fewer than the global batch size 4000" in capsys.readouterr().err
    assert cli("--micro-batch-size", "5") == 2
    assert "does not divide the per-process batch 16" in capsys.readouterr().err
    assert cli("--results-dir", "/proc/nope") == 2
    assert "/proc/nope" in capsys.readouterr().err
    # A run folder that holds a different config.
    assert cli("--run-name", "fixed") == 0
    capsys.readouterr()
    assert cli("--run-name", "fixed", "--lr", "5e-4") == 2
    err = capsys.readouterr().err
    assert "with other settings" in err and "lr: 0.001 -> 0.0005" in err


def test_corrupt_image_named(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", per_class=4)
    (images / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        train(tiny_config(tmp_path, data_path=str(images), vae="pixels", image_size=8, num_classes=3,
                          global_batch_size=13, max_steps=1))


def test_fid_of_the_ema_model_during_training(tmp_path):
    import numpy as np

    from fastdit.data import DigitsDataset
    from fastdit.evaluate.inception import random_inception_state_dict

    weights = tmp_path / "inception.pth"
    torch.save(random_inception_state_dict(seed=0), weights)
    real = DigitsDataset("heldout").images[:6]  # (6, 1, 8, 8) in [-1, 1] -> uint8 RGB, as an ADM batch
    pixels = ((real + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=pixels.numpy())
    result = train(tiny_config(tmp_path, max_steps=2, eval_every=2, eval_samples=4, eval_sampling_steps=2,
                               eval_ref=str(reference), inception_weights=str(weights), eval_batch_size=4))
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m for m in metrics if "eval/fid" in m]
    assert len(evaluated) == 1 and evaluated[0]["step"] == 2
    assert evaluated[0]["eval/fid"] > 0 and 0 <= evaluated[0]["eval/precision"] <= 1
