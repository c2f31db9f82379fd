"""`fastdit sweep` on a tiny digits run: the table, plot and recipe; resuming after a kill without
recomputing a scored point; 2 processes give the table of 1; the recipe reproduces the winner byte for
byte through `sample-ddp --recipe`; and the errors a user meets."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli
from fastdit.sweep import SweepSpace, Weights, parse_ema, parse_interval
from fastdit.sweep.state import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
# 2 EMAs x 2 guidance scales, 20 images each (2 chunks of 10), the best again with 30; Heun on 3 grid points.
SWEEP = ["--metric", "digits", "--ema", "last", "0.1", "--cfg-scale", "1", "2", "--num-sampling-steps", "3",
         "--num-samples", "20", "--confirm", "1", "--confirm-samples", "30", "--label-sampling", "equal",
         "--batch-size", "8", "--chunk-size", "10", "--device", "cpu", "--no-progress"]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A few steps of the demo's training with post-hoc EMA snapshots (no REPA: faster, nothing to sweep)."""
    from fastdit.demo.run import DemoConfig, train_config
    from fastdit.train.loop import train

    config = DemoConfig(out=str(tmp_path_factory.mktemp("demo")), steps=6, batch_size=16, posthoc_ema=True, repa=False,
                        progress=False)
    return train(train_config(config)).run_dir


@pytest.fixture(scope="module")
def reference(digits_run, tmp_path_factory) -> Path:
    """One process, in this process, from start to end: what every other way of running must give."""
    out = tmp_path_factory.mktemp("sweep") / "ref"
    assert run_cli("sweep", "--run-dir", digits_run, "--out", out, *SWEEP) == 0
    return out


def test_the_sweep_writes_its_table_plot_state_and_recipe(reference):
    table = (reference / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4 and sum("**best**" in row for row in rows) == 1
    assert {row.split(" | ")[0].lstrip("| ") for row in rows} == {"last export", "σ_rel 0.1"}
    plot = Image.open(reference / "sweep.png")
    assert plot.format == "PNG" and plot.size[0] > 2 * plot.size[1]  # one panel per swept setting, side by side
    state = json.loads((reference / STATE_FILE).read_text())
    assert sorted(state["points"]) == ["ema-last_cfg1_steps3", "ema-last_cfg2_steps3", "ema-sigma0.1_cfg1_steps3",
                                       "ema-sigma0.1_cfg2_steps3"]
    confirmed = [name for name, point in state["points"].items() if "30" in point["scores"]]
    assert len(confirmed) == 1 and all("20" in point["scores"] for point in state["points"].values())
    recipe = json.loads((reference / "recipe.json").read_text())
    assert recipe["name"] == confirmed[0] and recipe["values"]["num_samples"] == 30
    assert recipe["values"]["cfg_scale"] in (1.0, 2.0) and recipe["values"]["num_steps"] == 3
    assert recipe["values"]["label_sampling"] == "equal" and recipe["values"]["sampler"] == "heun"  # the run's own
    assert (recipe["seed"], recipe["batch_size"], recipe["chunk_size"]) == (0, 8, 10)
    # Only the confirmation's samples are kept; the EMA of length 0.1 was made from the snapshots once.
    assert [p.name for p in (reference / "samples").glob("*.npz")] == [f"{confirmed[0]}-n30.npz"]
    assert [p.name for p in (reference / "weights").iterdir()] == ["ema-sigma0.1-0000006.safetensors"]
    # The judge's scores: the share classified as their class is a whole number of 20 images.
    for point in state["points"].values():
        assert point["scores"]["20"]["class_match"] * 20 == pytest.approx(round(point["scores"]["20"]["class_match"] * 20))


def test_the_recipe_reproduces_the_winner_byte_for_byte_through_sample_ddp(reference, tmp_path, capsys):
    recipe = json.loads((reference / "recipe.json").read_text())
    out = tmp_path / "again.npz"
    assert run_cli("sample-ddp", "--recipe", reference / "recipe.json", "--out", out, "--no-progress", "--device", "cpu") == 0
    assert f"settings from recipe {recipe['name']}" in capsys.readouterr().out
    assert sha256(out) == sha256(reference / "samples" / f"{recipe['name']}-n30.npz")
    with np.load(out) as data:
        assert data["arr_0"].shape == (30, 8, 8, 3) and np.bincount(data["arr_1"]).tolist() == [3] * 10  # equal labels
    # A flag still overrides one field of the recipe: another seed, other images.
    other = tmp_path / "other.npz"
    assert run_cli("sample-ddp", "--recipe", reference / "recipe.json", "--out", other, "--seed", "1", "--no-progress",
                   "--device", "cpu") == 0
    assert sha256(other) != sha256(out)


KILL_AFTER_TWO_SCORES = """
import os, signal, sys
import fastdit.sweep.state as state
record = state.SweepState.record
calls = []
def record_then_die(self, *args, **kwargs):
    record(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 2:  # the second point's score is on disk: die as a killed job does
        os.kill(os.getpid(), signal.SIGKILL)
state.SweepState.record = record_then_die
from fastdit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_sweep_resumes_without_sampling_or_scoring_a_done_point_again(digits_run, reference, tmp_path,
                                                                                monkeypatch, capsys):
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_SCORES, "sweep", "--run-dir", str(digits_run),
                             "--out", str(out), *SWEEP], env=child_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(json.loads((out / STATE_FILE).read_text())["points"]) == 2 and not (out / "sweep.md").exists()

    import fastdit.sweep.runner as runner
    import fastdit.sweep.scoring as scoring

    sampled, scored = [], []
    sample, score = runner._sample, scoring.DigitsScorer.score
    monkeypatch.setattr(runner, "_sample", lambda job, point, count, *rest: sampled.append((point.name, count))
                        or sample(job, point, count, *rest))
    monkeypatch.setattr(scoring.DigitsScorer, "score", lambda self, path: scored.append(path.name) or score(self, path))
    assert run_cli("sweep", "--run-dir", digits_run, "--out", out, *SWEEP) == 0
    printed = capsys.readouterr().out
    assert "2 scored before" in printed
    # The two points left, and the confirmation: nothing done before is done again.
    assert len(sampled) == 3 and len(scored) == 3 and [count for _, count in sampled] == [20, 20, 30]
    assert (out / "sweep.md").read_text() == (reference / "sweep.md").read_text()
    assert (out / "recipe.json").read_text().replace(str(out), "") == (reference / "recipe.json").read_text().replace(str(reference), "")

    # Run again: everything is scored; more values on an axis sample only the new points.
    sampled.clear()
    assert run_cli("sweep", "--run-dir", digits_run, "--out", out, *SWEEP) == 0
    assert sampled == [] and "4 scored before" in capsys.readouterr().out
    more = [*SWEEP[:SWEEP.index("--num-sampling-steps")], "1.5", *SWEEP[SWEEP.index("--num-sampling-steps"):]]
    assert run_cli("sweep", "--run-dir", digits_run, "--out", out, *more) == 0
    assert sorted(name for name, count in sampled if count == 20) == ["ema-last_cfg1.5_steps3", "ema-sigma0.1_cfg1.5_steps3"]


def test_two_processes_give_the_table_of_one(digits_run, reference, tmp_path):
    out = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, "-m", "fastdit", "sweep", "--run-dir", str(digits_run), "--out", str(out), *SWEEP],
                          env={**child_env(), "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("byte for byte:") == 1  # the main process reports, once
    assert (out / "sweep.md").read_text() == (reference / "sweep.md").read_text()
    name = json.loads((reference / "recipe.json").read_text())["name"]
    assert sha256(out / "samples" / f"{name}-n30.npz") == sha256(reference / "samples" / f"{name}-n30.npz")


def test_a_sweep_with_other_settings_is_refused_in_the_same_folder(digits_run, reference, capsys):
    seed = SWEEP.index("--batch-size")
    status = run_cli("sweep", "--run-dir", digits_run, "--out", reference, *SWEEP[:seed], "--seed", "1", *SWEEP[seed:])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a sweep with other settings (seed: 0 there, 1 now)" in err


@pytest.mark.parametrize("flags, message", [
    (["--cfg-scale", "0.5"], "point ema-last_cfg0.5: "),
    (["--ema", "0.5"], "an EMA length σ_rel must be in"),
    (["--guidance-interval", "0.3"], "write LOW:HIGH"),
    (["--confirm", "1", "--confirm-samples", "10"], "must be more than --num-samples"),
    (["--metric", "fid"], "pass --ref"),
])
def test_bad_settings_are_one_line_errors_before_anything_is_sampled(digits_run, tmp_path, capsys, flags, message):
    base = ["--metric", "digits", "--num-samples", "20", "--confirm", "0", "--device", "cpu", "--no-progress"]
    assert run_cli("sweep", "--run-dir", digits_run, "--out", tmp_path / "bad", *base, *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "bad" / "samples").exists()


def test_ema_lengths_need_a_run_with_snapshots(tmp_path, digits_run, capsys):
    export = sorted((digits_run / "checkpoints").glob("*-ema.safetensors"))[-1]
    assert run_cli("sweep", "--ckpt", export, "--out", tmp_path / "s", "--ema", "0.1", "--metric", "digits",
                   "--confirm", "0", "--device", "cpu") == 2
    assert "needs --run-dir" in capsys.readouterr().err


def test_points_and_their_names():
    space = SweepSpace(ema=(Weights("last"), parse_ema("0.05")),
                       axes={"cfg_scale": (1.5, 2.0), "guidance_interval": (None, parse_interval("0.3:1"))})
    names = [point.name for point in space.points()]
    assert names[:4] == ["ema-last_cfg1.5_intnone", "ema-last_cfg1.5_int0.3-1", "ema-last_cfg2_intnone",
                         "ema-last_cfg2_int0.3-1"]
    assert len(names) == 8 and names[4].startswith("ema-sigma0.05_")  # the EMA outermost: weights loaded once
    assert space.swept == ["ema", "cfg_scale", "guidance_interval"]
    assert parse_ema("runs/x/0000400-ema.safetensors") == Weights("file", "runs/x/0000400-ema.safetensors")
    assert parse_interval("none") is None and parse_interval("0:0.75") == (0.0, 0.75)


def test_an_inception_metric_sweep_of_a_checkpoint(tmp_path):
    """--metric fid over one checkpoint (no EMA axis), scored with Inception features against a reference,
    no confirmation: the best point wins as it is. Random Inception weights: the numbers mean nothing,
    the path is what is tested (the scores equal `fastdit evaluate`'s)."""
    import torch

    from fastdit.checkpoint import export_weights
    from fastdit.evaluate.inception import random_inception_state_dict
    from fastdit.model_info import LatentInfo, ModelInfo
    from fastdit.models import build_model

    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=1, num_classes=4)
    ckpt = export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None)),
                          tmp_path / "tiny.safetensors")
    weights = tmp_path / "inception.pt"
    torch.save(random_inception_state_dict(seed=0), weights)
    ref = tmp_path / "ref.npz"
    np.savez(ref, np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    out = tmp_path / "sweep"
    assert run_cli("sweep", "--ckpt", ckpt, "--out", out, "--metric", "fid", "--ref", ref, "--inception-weights", weights,
                   "--cfg-scale", "1", "3", "--num-sampling-steps", "2", "--num-samples", "6", "--confirm", "0",
                   "--keep-samples", "--device", "cpu", "--no-progress") == 0
    state = json.loads((out / STATE_FILE).read_text())
    recipe = json.loads((out / "recipe.json").read_text())
    best = min(state["points"], key=lambda name: state["points"][name]["scores"]["6"]["fid"])
    assert recipe["name"] == best and recipe["values"]["num_samples"] == 6
    assert Path(recipe["ckpt"]) == ckpt  # outside the sweep's folder: kept as given
    evaluated = tmp_path / "metrics.json"
    assert run_cli("evaluate", out / "samples" / f"{best}-n6.npz", ref, "--metrics", "fid", "--inception-weights",
                   weights, "--out-json", evaluated, "--device", "cpu") == 0
    assert json.loads(evaluated.read_text())["fid"] == pytest.approx(state["points"][best]["scores"]["6"]["fid"], rel=1e-9)
