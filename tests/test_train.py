"""Training: resume after SIGKILL is bit-identical, options keep one code path, bad input is clear."""

import json
import math
import os
import re
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
    return TrainConfig.create(**fields)


def final_state(run_dir: Path) -> dict:
    newest = sorted((run_dir / "checkpoints").glob("*.pt"))[-1]
    return torch.load(newest, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# The process is part of what resumes: flow matching (logit-normal times, block options on) too.
FLOW = ["--objective", "flow", "--time-sampling", "logit-normal", "--rope", "--qk-norm", "--norm", "rmsnorm", "--mlp", "swiglu"]
FLOW_FIELDS = dict(objective="flow", time_sampling="logit-normal", rope=True, qk_norm=True, norm="rmsnorm", mlp="swiglu")
# x-prediction (JiT) with JiT's time sampling, on the official blocks.
X_PRED = ["--objective", "x-pred", "--time-sampling", "logit-normal", "--logit-normal-mean", "-0.8",
          "--logit-normal-std", "0.8"]
X_PRED_FIELDS = dict(objective="x-pred", time_sampling="logit-normal", logit_normal_mean=-0.8, logit_normal_std=0.8)
# MeanFlow (its JVP target) with guidance trained in (the extra no-grad forwards of both guided fields).
MEANFLOW = ["--objective", "meanflow", "--meanflow-omega", "2.0", "--meanflow-kappa", "0.25", "--meanflow-ratio", "0.5"]
MEANFLOW_FIELDS = dict(objective="meanflow", meanflow_omega=2.0, meanflow_kappa=0.25, meanflow_ratio=0.5)
# Improved MeanFlow: the v-loss's extra forward, and a guidance scale drawn per sample as an input.
IMPROVED_MEANFLOW = ["--objective", "meanflow", "--meanflow-v-loss", "--meanflow-guidance-input", "--meanflow-ratio", "0.5"]
IMPROVED_MEANFLOW_FIELDS = dict(objective="meanflow", meanflow_v_loss=True, meanflow_guidance_input=True, meanflow_ratio=0.5)
# Token routing (TREAD): each sample's kept tokens are drawn with its other draws; under RoPE (rows that
# follow the tokens), and with MeanFlow (an unrouted target, a routed trained forward).
ROUTE = ["--route", "0.5", "--route-blocks", "1:2"]
ROUTE_FIELDS = dict(route=0.5, route_blocks="1:2")
# DiT^DH (RAE's DDT head after the tiny body) with RAE's objective: its shifted logit-normal draws; routed
# through a span of its body too.
DITDH = ["--model", "DiTDH-T", "--objective", "rae", "--time-shift-base", "16"]
DITDH_FIELDS = dict(model="DiTDH-T", objective="rae", time_shift_base=16)
OBJECTIVE_RUNS = pytest.mark.parametrize(
    "flags, fields", [([], {}), (FLOW, FLOW_FIELDS), (X_PRED, X_PRED_FIELDS), (MEANFLOW, MEANFLOW_FIELDS),
                      (IMPROVED_MEANFLOW, IMPROVED_MEANFLOW_FIELDS), (FLOW + ROUTE, {**FLOW_FIELDS, **ROUTE_FIELDS}),
                      (MEANFLOW + ROUTE, {**MEANFLOW_FIELDS, **ROUTE_FIELDS}), (DITDH, DITDH_FIELDS),
                      (DITDH + ROUTE, {**DITDH_FIELDS, **ROUTE_FIELDS})],
    ids=["ddpm", "flow", "x-pred", "meanflow", "improved-meanflow", "flow-route", "meanflow-route", "ditdh",
         "ditdh-route"])
# The dispersive loss (groups of 4: inside a micro-batch of 2 processes' runs), with x-prediction: resumed
# here like the objectives; its 1-vs-2-process test is in test_extensions.py (it needs its own bound).
DISPERSE = ["--disperse", "0.5", "--disperse-group", "4"]
DISPERSE_FIELDS = dict(disperse=0.5, disperse_group=4)
RESUMED_RUNS = pytest.mark.parametrize(
    "flags, fields", [*OBJECTIVE_RUNS.args[1], (X_PRED + DISPERSE, {**X_PRED_FIELDS, **DISPERSE_FIELDS})],
    ids=[*OBJECTIVE_RUNS.kwargs["ids"], "x-pred-disperse"])


def kill_once_checkpointed(command: list[str], run_dir: Path, *, step: int, last: int) -> None:
    """Start the training `command`, SIGKILL it once its step-`step` checkpoint is on disk (a tiny step
    takes milliseconds, so it may have written one or two more by then), and check that it had not
    finished: the step-`last` checkpoint is not there."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / f"{step:07d}.pt").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "checkpoints" / f"{last:07d}.pt").exists()


@RESUMED_RUNS
def test_sigkill_and_rerun_gives_bit_identical_weights(tmp_path, flags, fields):
    reference = train(tiny_config(tmp_path / "reference", max_steps=8, ckpt_every=2, **fields))
    assert reference.step == 8

    command = [sys.executable, "-m", "fastdit", "train", *TINY, *flags, "--max-steps", "8", "--ckpt-every", "2",
               "--results-dir", str(tmp_path / "killed")]
    run_dir = tmp_path / "killed" / reference.run_dir.name
    kill_once_checkpointed(command, run_dir, step=4, last=8)

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
    assert json.loads((run / "config.json").read_text())["optimisation"]["max_steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000004-ema.safetensors", "0000004.pt"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # DDPM's loss terms are logged by name beside their sum: MSE(ε) and the VLB.
    assert {"loss", "mse", "vb", "steps_per_sec", "images_per_sec", "peak_memory_gb"} <= metrics[0].keys()
    assert metrics[0]["loss"] == pytest.approx(metrics[0]["mse"] + metrics[0]["vb"], rel=1e-6)
    # what the demo's loss plot reads as the terms: exactly these, nothing of the throughput statistics
    from fastdit.demo.plots import read_loss_terms

    assert list(read_loss_terms(run / "metrics.jsonl")[1]) == ["loss", "mse", "vb"]
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


def logged_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Same initial weights and draws in every precision: the losses differ from fp32 only by the rounding
# of the half-precision matmuls, unit roundoff u = 2^-8 (bf16) or 2^-11 (fp16) per operation, over
# ~16 roundings on the path through a depth-2 DiT and its update, so |rel| <= 16 u. Step 1 is left
# out: DiT's zero-initialised output layer makes its loss the same in every precision.
@pytest.mark.parametrize("precision, unit_roundoff", [("bf16", 2**-8), ("fp16", 2**-11)])
def test_mixed_precision_trains_like_fp32(tmp_path, precision, unit_roundoff):
    fp32 = train(tiny_config(tmp_path / "fp32", max_steps=3))
    mixed = train(tiny_config(tmp_path / precision, max_steps=3, precision=precision))
    assert (final_state(mixed.run_dir)["scaler"] is not None) == (precision == "fp16")
    reference, losses = logged_losses(fp32.run_dir)[1:], logged_losses(mixed.run_dir)[1:]
    assert losses[0] != reference[0]  # the half-precision path really ran
    assert losses == pytest.approx(reference, rel=16 * unit_roundoff)


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
    from fastdit.objectives.ddpm import DDPM

    original = DDPM.losses

    def poisoned(self, *args, **kwargs):  # the loop trains through the objective's own `losses`
        return {name: value * float("nan") for name, value in original(self, *args, **kwargs).items()}

    monkeypatch.setattr(DDPM, "losses", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 3.*last good checkpoint is intact"):
        train(tiny_config(tmp_path, max_steps=4, ckpt_every=2))
    assert_same_tensors(final_state(config.run_dir())["model"], before["model"])


def metrics_records(run_dir: Path) -> dict[int, dict]:
    return {record["step"]: record for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def checkpoint_of(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"{step:07d}.pt", map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict):
    """Model, EMA and optimizer state (AdamW's moments and step counts) bit for bit."""
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key in a["optimizer"]["state"]:
        assert_same_tensors(a["optimizer"]["state"][key], b["optimizer"]["state"][key])


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_skipped_step_changes_nothing_but_the_position(tmp_path, monkeypatch, capsys, kind):
    # Issue #18, item 4: --skip-nonfinite K. Step 3 is made non-finite (its loss, or only its gradient).
    import nonfinite_steps

    nonfinite_steps.install(monkeypatch.setattr, {3}, kind)
    skipping = train(tiny_config(tmp_path / "a", max_steps=6, ckpt_every=1, keep_last=10, skip_nonfinite=1))
    assert skipping.step == 6
    run_a = skipping.run_dir
    # After the skipped step: model, EMA and optimizer exactly as after step 2; only the position moved.
    assert_same_training_state(checkpoint_of(run_a, 3), checkpoint_of(run_a, 2))
    assert checkpoint_of(run_a, 3)["position"] == {"step": 3, "epoch": 0, "step_in_epoch": 3}
    assert not torch.equal(checkpoint_of(run_a, 4)["model"]["final_layer.linear.weight"],
                           checkpoint_of(run_a, 3)["model"]["final_layer.linear.weight"])  # training went on
    problem = "the loss became inf" if kind == "loss" else "the gradient norm became"
    out = capsys.readouterr().out
    assert f"step 0000003  {problem}" in out and "skipped, no update (1 in a row, --skip-nonfinite 1)" in out
    records = metrics_records(run_a)
    assert records[3]["skipped_steps"] == 1 and "loss" not in records[3] and "grad_norm" not in records[3]
    for step in (1, 2, 4, 5, 6):  # the gradient norm of every step that updated, logged beside the loss
        assert records[step]["skipped_steps"] == 0
        assert math.isfinite(records[step]["grad_norm"]) and records[step]["grad_norm"] > 0

    # A run that never saw step 3's update: stop at step 2, mark its checkpoint as step 3 (the batch and
    # draws of step 3 used up, nothing updated), and resume. It must end where the skipping run ended.
    train(tiny_config(tmp_path / "b", max_steps=2, ckpt_every=2))
    run_b = tmp_path / "b" / run_a.name
    stored = checkpoint_of(run_b, 2)
    stored["position"] = {"step": 3, "epoch": 0, "step_in_epoch": 3}
    torch.save(stored, run_b / "checkpoints" / "0000003.pt")
    never_updated = train(tiny_config(tmp_path / "b", max_steps=6, ckpt_every=3))
    assert_same_training_state(final_state(never_updated.run_dir), final_state(run_a))


def test_more_non_finite_steps_in_a_row_than_allowed_stop_the_run(tmp_path, monkeypatch):
    import nonfinite_steps

    nonfinite_steps.install(monkeypatch.setattr, {3, 4, 5})
    with pytest.raises(NonFiniteLoss, match="loss became inf at step 5.*last good checkpoint is intact"):
        train(tiny_config(tmp_path, max_steps=8, ckpt_every=2, skip_nonfinite=2))
    run_dir = tiny_config(tmp_path).run_dir()
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("*.pt"))] == ["0000002.pt", "0000004.pt"]
    # Two in a row are allowed, and the count starts again after a good step.
    monkeypatch.undo()
    nonfinite_steps.install(monkeypatch.setattr, {3, 4, 6, 7})
    assert train(tiny_config(tmp_path / "again", max_steps=8, ckpt_every=8, skip_nonfinite=2)).step == 8


def test_kill_and_resume_with_skipped_steps_is_bit_exact(tmp_path, monkeypatch):
    import nonfinite_steps

    fields = dict(max_steps=8, ckpt_every=2, skip_nonfinite=1)
    with monkeypatch.context() as patch:
        nonfinite_steps.install(patch.setattr, {3, 6})  # one step before the kill, one after
        reference = train(tiny_config(tmp_path / "reference", **fields))
    # The killed run: a process that poisons the same steps (keyed by step number, so the resumed
    # process does too), killed once checkpoint 4 is on disk, then the same command again.
    script = ("import sys; sys.path.insert(0, {tests!r}); import nonfinite_steps; "
              "nonfinite_steps.install(setattr, {{3, 6}}); from fastdit.cli import main; sys.exit(main(sys.argv[1:]))"
              ).format(tests=str(Path(__file__).parent))
    command = [sys.executable, "-c", script, "train", *TINY, "--max-steps", "8", "--ckpt-every", "2",
               "--skip-nonfinite", "1", "--results-dir", str(tmp_path / "killed")]
    run_dir = tmp_path / "killed" / reference.run_dir.name
    kill_once_checkpointed(command, run_dir, step=4, last=8)
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # The kill lands at checkpoint 4 or, on a fast machine, a checkpoint or two later (a tiny step takes
    # milliseconds): the rerun skips step 6 again when it resumed before it.
    resumed_from = int(re.search(r"resuming from \S*?(\d{7})\.pt", rerun.stdout).group(1))
    assert resumed_from in (4, 6)
    assert ("step 0000006  the loss became inf: skipped" in rerun.stdout) == (resumed_from < 6)
    resumed = final_state(run_dir)
    assert resumed["position"] == final_state(reference.run_dir)["position"]
    assert_same_training_state(resumed, final_state(reference.run_dir))


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
    assert "argument --precision: invalid choice: 'fp8' (choose from 'fp32', 'bf16', 'fp16')" in capsys.readouterr().err
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
    config = tiny_config(tmp_path, max_steps=2, eval_every=2, eval_samples=4, eval_sampling_steps=2,
                         eval_ref=str(reference), inception_weights=str(weights), eval_batch_size=4)
    result = train(config)
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m for m in metrics if "eval/fid" in m]
    assert len(evaluated) == 1 and evaluated[0]["step"] == 2
    # What was logged is the evaluation of the step-2 EMA weights (not the raw model's, nor earlier
    # ones): the same computation on bitwise-equal weights, seeds and batches in one process, so only
    # float64 rounding could differ.
    from fastdit.distributed import init_from_env
    from fastdit.train.evaluation import fid_of_model
    from fastdit.train.training_data import open_training_data

    ema, _ = load_model(result.export)
    cpu = init_from_env("cpu")
    expected = fid_of_model(config, config.build_objective(), ema, open_training_data(config, cpu.device), cpu)
    assert {k.removeprefix("eval/"): v for k, v in evaluated[0].items() if k.startswith("eval/")} == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("flags, message", [
    # nan/inf are refused while parsing (cli.arg_types); the config's own check is in the next test.
    (["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--beta1", "2"], "--beta1 must be in [0, 1), got 2.0"),
    (["--beta2", "-0.1"], "--beta2 must be in [0, 1), got -0.1"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
    (["--warmup-steps", "-5"], "--warmup-steps must be >= 0, got -5"),
    (["--grad-clip", "nan"], "argument --grad-clip: 'nan' is not a finite number"),
    (["--grad-clip", "-1"], "--grad-clip must be > 0, got -1.0"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0"),
    (["--depth", "0"], "--depth must be >= 1, got 0"),
    (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    (["--global-seed", "-3"], "--global-seed must be >= 0, got -3"),
    (["--sample-every", "2", "--sample-steps", "1"], "--sample-steps: number of sampling steps must be in [2, 1000], got 1"),
    (["--objective", "score"], "argument --objective: invalid choice: 'score' (choose from 'ddpm', 'flow', "),
    (["--objective", "flow", "--time-sampling", "beta"], "argument --time-sampling: invalid choice: 'beta' (choose from 'uniform', 'logit-normal')"),
    (["--objective", "flow", "--logit-normal-std", "0"], "logit-normal std must be finite and > 0, got 0.0"),
    (["--rope", "--hidden-size", "24", "--num-heads", "4"], "rope needs a head dimension (hidden_size / num_heads = 24 / 4 = 6) divisible by 4"),
    (["--mlp", "relu"], "argument --mlp: invalid choice: 'relu' (choose from 'gelu', 'swiglu')"),
])
def test_bad_optimizer_and_number_settings_write_nothing(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main(["train", *TINY, "--results-dir", str(tmp_path / "runs"), "--max-steps", "1", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    # One line: ours alone, or argparse's usage lines followed by its one error line.
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # so the corrected command is not refused as "another run"


def test_python_api_gets_the_same_checks(tmp_path):
    for bad in (dict(lr=float("nan")), dict(eval_cfg_scale=float("inf")), dict(epochs=2.5), dict(lr="1e-4")):
        with pytest.raises(UserError, match="must be a (finite |whole )?number"):
            train(tiny_config(tmp_path, **bad))
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, capsys):
    from fastdit.run_folder import exclusive_lock

    run_dir = tiny_config(tmp_path).run_dir()
    with exclusive_lock(run_dir, "fastdit train"):  # as a first run, still training, holds it
        with pytest.raises(SystemExit) as exit_:
            main(["train", *TINY, "--results-dir", str(tmp_path), "--max-steps", "2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{str(run_dir)!r} is in use by fastdit train (pid {os.getpid()}" in err and err.count("\n") == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [".fastdit.lock"]  # nothing of the second run


def test_resume_removes_stale_temporaries_writes_a_missing_export_and_cuts_the_metrics(tmp_path):
    config = tiny_config(tmp_path, max_steps=2, ckpt_every=2)
    result = train(config)
    run = result.run_dir
    # What a run killed after its step-2 checkpoint leaves: half-written saves of step 4 (ours and
    # safetensors'), no export of step 2 yet (killed between the two writes), metrics of steps 3 and 4,
    # the last one cut short.
    stale = [run / "checkpoints" / ".0000004.pt.x1y2z3.tmp", run / "checkpoints" / ".tmpQ1w2E3",
             run / ".config.json.abc.tmp", run / "samples" / ".0000004.png.abc.tmp"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
    result.export.unlink()
    with open(run / "metrics.jsonl", "a") as log:
        log.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    resumed = train(tiny_config(tmp_path, max_steps=4, ckpt_every=2, keep_last=2))
    assert not any(path.exists() for path in stale)
    load_model(run / "checkpoints" / "0000002-ema.safetensors")
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert resumed.step == 4


def test_checkpoints_with_index_keyed_optimizer_state_still_resume(tmp_path):
    """Checkpoints of version 1 (before FSDP) keyed the optimizer state by parameter index; version 2
    keys it by parameter name. A version-1 run folder resumes to the same weights."""
    reference = train(tiny_config(tmp_path / "a", max_steps=4, ckpt_every=2))
    early = train(tiny_config(tmp_path / "b", max_steps=2, ckpt_every=2))
    state = torch.load(early.checkpoint, weights_only=True)
    names = state["optimizer"]["param_groups"][0]["params"]
    state["optimizer"] = {
        "state": {index: state["optimizer"]["state"][name] for index, name in enumerate(names)},
        "param_groups": [{**state["optimizer"]["param_groups"][0], "params": list(range(len(names)))}],
    }
    state["version"] = 1
    torch.save(state, early.checkpoint)
    resumed = train(tiny_config(tmp_path / "b", max_steps=4, ckpt_every=2))
    assert_same_tensors(final_state(resumed.run_dir)["model"], final_state(reference.run_dir)["model"])
    assert_same_tensors(final_state(resumed.run_dir)["ema"], final_state(reference.run_dir)["ema"])


def test_a_checkpoint_from_more_gpus_resumes_where_fewer_are_visible(tmp_path, monkeypatch):
    """Checkpoints once held one CUDA generator state per visible GPU and resuming restored them all:
    with fewer GPUs visible (another SLURM shape) `set_rng_state_all` raised IndexError. The step's draws
    never use the global CUDA generators, so neither saving nor resuming touches them."""
    from fastdit.train import state as state_module

    first = train(tiny_config(tmp_path, max_steps=2, ckpt_every=2))
    path = first.checkpoint
    content = torch.load(path, map_location="cpu", weights_only=True)
    assert "cuda" not in content["rng"]
    content["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8  # as an 8-GPU run wrote them before
    torch.save(content, path)

    def fewer_gpus(states):  # what torch does with more states than visible GPUs
        raise IndexError("list index out of range")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", fewer_gpus)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)])
    state_module.set_rng_state(content["rng"])
    monkeypatch.undo()
    assert train(tiny_config(tmp_path, max_steps=4, ckpt_every=2)).step == 4


def test_a_run_whose_every_step_was_skipped_saves_nothing(tmp_path, monkeypatch):
    # Every step non-finite, but --skip-nonfinite lets the run reach its end: its export would be the
    # initial weights under the run's name. It stops instead, and writes no checkpoint or export.
    import nonfinite_steps

    nonfinite_steps.install(monkeypatch.setattr, set(range(1, 5)))
    with pytest.raises(NonFiniteLoss, match="every one of the 4 steps this run took was skipped"):
        train(tiny_config(tmp_path, max_steps=4, ckpt_every=4, skip_nonfinite=10))
    assert not list((tmp_path / "DiT-T-2-8px-digits" / "checkpoints").glob("*"))


def test_the_non_finite_message_names_the_method_and_only_a_checkpoint_that_exists(tmp_path, monkeypatch):
    # REPA's encoder gives NaN tokens: the repa term is not finite while the objective's loss is. The message
    # says so instead of blaming the learning rate, and does not promise a checkpoint the run never wrote.
    from fastdit.demo.encoder import DigitTokens, save_digit_encoder
    from fastdit.train.extensions.repa import RepresentationAlignment

    torch.manual_seed(1)
    encoder = str(save_digit_encoder(DigitTokens(), tmp_path / "tiny.ts"))
    monkeypatch.setattr(RepresentationAlignment, "targets", lambda self, images: torch.full(
        (len(images), 16, self.encoder.dim), float("nan")))
    with pytest.raises(NonFiniteLoss) as stopped:
        train(tiny_config(tmp_path / "runs", repa=encoder, repa_depth=1, repa_projector_dim=32, max_steps=4))
    message = str(stopped.value)
    assert "the loss became nan through its repa term (from the repa training method" in message
    assert "the learning rate is not the cause" in message and "--lr" not in message
    assert "No checkpoint was written yet" in message and "intact" not in message


def test_a_failed_sample_grid_saves_the_steps_before_it_stops(tmp_path, monkeypatch):
    from fastdit import sampling

    def non_finite(*args, **kwargs):
        raise UserError("sampling gave non-finite latents (NaN or inf) for 40 of 40 image(s)")

    monkeypatch.setattr(sampling, "generate", non_finite)
    with pytest.raises(UserError, match="the sample grid of step 3 failed .*after saving 0000003.pt"):
        train(tiny_config(tmp_path, max_steps=6, ckpt_every=4, sample_every=3, sample_steps=2))
    assert (tmp_path / "DiT-T-2-8px-digits" / "checkpoints" / "0000003.pt").is_file()
