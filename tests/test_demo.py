"""`fastdit demo` end to end at a reduced size: every file is written, in the right format."""

import json
import os
import shlex
import subprocess

import numpy as np
import pytest
from PIL import Image

from fastdit.checkpoint import load_model
from fastdit.cli import main

SAMPLES_PER_CLASS = 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    (out / "train").mkdir(parents=True)  # what a demo stopped before its training began leaves: taken as ours
    (out / "train" / ".fastdit.lock").write_text("")
    argv = ["demo", "--out", str(out), "--steps", "24", "--batch-size", "32", "--samples-per-class", str(SAMPLES_PER_CLASS),
            "--sampling-steps", "4", "--classifier-epochs", "2", "--no-progress"]
    capture = pytest.MonkeyPatch()  # module scope: capsys is per test, so read stdout through a file
    printed = []
    capture.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    capture.chdir(out.parent)  # the folder the user runs the demo from, and then its printed command
    try:
        status = main(argv)
    finally:
        capture.undo()
    return out, status, "\n".join(printed)


def test_demo_writes_samples_npz(demo_run):
    out, status, _ = demo_run
    assert status == 0
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    # RGB as sample-ddp writes it (fastdit's one rule for gray: the channel repeated), so `fastdit evaluate` takes it.
    assert images.dtype == np.uint8 and images.shape == (10 * SAMPLES_PER_CLASS, 8, 8, 3)
    assert (images == images[..., :1]).all()
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), SAMPLES_PER_CLASS))


def test_demo_writes_grid_with_one_row_per_digit_and_loss_plot(demo_run):
    out, _, _ = demo_run
    grid = Image.open(out / "grid.png")
    cell, padding, scale = 8, 2, 4
    assert grid.size == ((SAMPLES_PER_CLASS * (cell + padding) + padding) * scale, (10 * (cell + padding) + padding) * scale)
    loss_plot = Image.open(out / "loss.png")
    assert loss_plot.format == "PNG" and loss_plot.size[0] > 100


def test_demo_checkpoint_loads_for_sampling(demo_run):
    out, _, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    model, info = load_model(report["files"]["checkpoint"])
    assert info.latent.kind == "pixels" and model.config.num_classes == 10 and model.config.input_size == 8
    assert report["train"]["steps"] == 24


def test_demo_report_holds_the_evaluation(demo_run):
    out, _, printed = demo_run
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 10 * SAMPLES_PER_CLASS
    # Every class has the same number of samples, so the overall match is the mean of the per-class ones,
    # and each is a whole number of samples out of SAMPLES_PER_CLASS (float64 sums of 10 terms: 1e-12).
    per_class = report["class_match_per_class"]
    assert len(per_class) == 10 and report["class_match"] == pytest.approx(np.mean(per_class), abs=1e-12)
    assert all(value * SAMPLES_PER_CLASS == pytest.approx(round(value * SAMPLES_PER_CLASS), abs=1e-9) for value in per_class)
    judge = report["classifier"]
    assert judge["num_train"] + judge["num_test"] == 1797 and judge["num_train"] == 359
    correct = judge["test_accuracy"] * judge["num_test"]  # a count of digits
    assert correct == pytest.approx(round(correct), abs=1e-9)
    fd = report["frechet_distance"]
    assert fd["num_real_compared"] == 10 * SAMPLES_PER_CLASS and fd["num_reference"] == judge["num_test"] - judge["num_test"] // 2
    assert set(report["files"]) == {"samples", "grid", "loss_plot", "checkpoint", "report"}
    # The console shows the figures and where the files are.
    assert "samples classified as their class" in printed and f"files in {out}" in printed


def test_demo_rejects_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path / "x"), "--samples-per-class", "1"])
    assert exit_info.value.code == 2
    assert "--samples-per-class" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing is trained for a run that cannot finish


def test_demo_refuses_a_folder_trained_with_other_settings(demo_run, capsys):
    out, _, _ = demo_run
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out), "--steps", "24", "--batch-size", "32", "--lr", "5e-4", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lr" in err and "another --out" in err


def test_demo_refuses_a_folder_of_other_files(tmp_path, capsys):
    theirs = tmp_path / "grid.png"  # a file of the user's that the demo would write over
    theirs.write_bytes(b"not ours")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path), "--steps", "1", "--no-progress"])
    assert exit_info.value.code == 2
    assert "holds other files (grid.png, notes.txt) and no earlier demo" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "notes.txt"] and theirs.read_bytes() == b"not ours"


def test_the_loss_plot_reads_the_terms_the_recipe_logged(demo_run):
    from fastdit.demo.plots import read_loss_terms

    out, _, _ = demo_run
    steps, terms = read_loss_terms(out / "train" / "metrics.jsonl")
    # the demo's recipe: flow matching (one term) with REPA's "repa" added to it; the step logs the objective's
    # own loss beside their sum ("objective_loss"), which the plot shows as "objective" after "loss"
    assert list(terms) == ["loss", "objective", "repa"] and steps[-1] == 24
    weight = json.loads((out / "train" / "config.json").read_text())["alignment"]["repa_weight"]
    # "loss" is the objective's loss plus λ·repa, per sample in float32, then averaged in float64: the logged
    # means agree to float32 rounding (a few u = 2^-24 of the loss's size), far inside 1e-5.
    np.testing.assert_allclose(terms["objective"], terms["loss"] - weight * terms["repa"], rtol=1e-5, atol=1e-6)


def test_the_printed_sample_command_runs_as_printed_and_writes_the_digits(demo_run):
    # What a new user does next: paste the demo's last line into the same shell (PATH as it is, .venv
    # not activated), in the folder the demo ran from.
    out, _, printed = demo_run
    command = printed.split("sample more with: ")[-1].splitlines()[0]
    words = shlex.split(command)
    assert "--ckpt" in words and "--out" in words
    done = subprocess.run(words, cwd=out.parent, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    picture = Image.open(out.parent / words[words.index("--out") + 1])
    labels = words[words.index("--class-labels") + 1:][:10]
    assert picture.format == "PNG" and picture.mode == "L" and labels == [str(d) for d in range(10)]
    # One row of ten 8x8 digits with 2-pixel gaps (102x12), enlarged by a whole factor if at all.
    cell, padding = 8, 2
    width, height = 10 * (cell + padding) + padding, cell + 2 * padding
    scale = picture.width // width
    assert scale >= 1 and picture.size == (width * scale, height * scale)
    grid = np.asarray(picture)[::scale, ::scale]
    cells = [grid[padding:padding + cell, padding + k * (cell + padding):padding + k * (cell + padding) + cell]
             for k in range(10)]
    gaps = grid.copy()
    for k in range(10):
        gaps[padding:padding + cell, padding + k * (cell + padding):padding + k * (cell + padding) + cell] = 0
    assert not gaps.any() and all(c.std() > 0 for c in cells)  # black gaps; every cell holds a drawn image
    # The same words run in this process draw the same picture: per-image seeds make it independent of the
    # process; other thread counts may round a float32 value across a level boundary, so one level of 255.
    again = out.parent / "digits-again.png"
    assert main([*words[words.index("sample"):words.index("--out")], "--out", str(again),
                 *words[words.index("--out") + 2:]]) == 0
    difference = np.abs(np.asarray(Image.open(again), dtype=np.int16) - np.asarray(picture, dtype=np.int16))
    assert difference.max() <= 1


# What `make demo` does not install: the other extras' top-level packages (scipy comes with scikit-learn)
NOT_IN_THE_DEMO_EXTRA = ("diffusers", "huggingface_hub", "tensorboard", "accelerate", "gradio", "torchdiffeq", "timm", "transformers",
                         "wandb", "IPython", "pytest")


def test_the_demo_needs_only_the_core_and_the_demo_extra(tmp_path):
    # pyproject's `demo` extra (scikit-learn, matplotlib) beside the core is all the demo may import: run a
    # short demo where every other extra's package fails to import, as in an environment without them.
    import sys
    import textwrap

    blocked = sorted(NOT_IN_THE_DEMO_EXTRA)
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Absent())
        from fastdit.cli import main
        status = main(["demo", "--out", "out", "--steps", "2", "--batch-size", "16", "--samples-per-class", "2",
                       "--sampling-steps", "2", "--classifier-epochs", "1", "--no-progress"])
        print("imported:", sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r}))
        sys.exit(status)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported: []" in done.stdout and (tmp_path / "out" / "grid.png").is_file()


def test_each_objective_of_the_demo_trains_its_best_measured_recipe():
    """`fastdit demo --objective NAME` takes that objective's recipe measured on the digits (README, "The digits
    demo's recipe"): x-pred JiT's times for 500 steps (99.8%, where other times gave 88%), DiT's IDDPM recipe its
    1,000 steps on the official blocks, MeanFlow without REPA; any flag still overrides one field."""
    from fastdit.demo.run import DemoConfig, train_config

    xpred = train_config(DemoConfig(objective="x-pred"))
    assert (xpred.objective.logit_normal_mean, xpred.objective.logit_normal_std) == (-0.8, 0.8)
    assert xpred.optimisation.max_steps == 500 and not xpred.alignment.repa
    ddpm = train_config(DemoConfig(objective="ddpm"))
    assert ddpm.optimisation.max_steps == 1000 and ddpm.model.norm == "layernorm" and not ddpm.alignment.repa
    flow = train_config(DemoConfig())
    assert flow.optimisation.max_steps == 400 and flow.model.norm == "rmsnorm" and flow.alignment.repa
    assert train_config(DemoConfig(objective="x-pred", steps=20, repa=True)).optimisation.max_steps == 20
