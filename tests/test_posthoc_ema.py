"""Post-hoc EMA (EDM2): the σ_rel ↔ γ relation, the least-squares reconstruction against directly
tracked averages, `train --posthoc-ema` resuming bit-exactly, and `fastdit ema`."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastdit.checkpoint import load_model
from fastdit.cli import main
from fastdit.errors import UserError
from fastdit.power_ema import (
    GAMMA_AT_PEAK,
    SIGMA_REL_MAX,
    fit_profile,
    gamma_of_sigma_rel,
    power_ema_decay,
    sigma_rel_of_gamma,
)
from fastdit.train.loop import train
from fastdit.train.posthoc_ema import PowerEMAs, list_snapshots
from fastdit.train.posthoc_reconstruct import reconstruct_ema
from test_train import TINY, assert_same_tensors, final_state, kill_once_checkpointed, tiny_config

POSTHOC = ["--posthoc-ema", "--posthoc-every", "3"]


# ----------------------------------------------------------------------------------------------
# σ_rel ↔ γ
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.2, 0.29])
def test_gamma_gives_a_profile_with_that_sigma_rel_measured_from_the_ema_itself(sigma_rel):
    gamma = gamma_of_sigma_rel(sigma_rel)
    assert gamma >= GAMMA_AT_PEAK
    assert sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # the cubic of EDM2 eq. 3 (σ_rel² (γ+2)²(γ+3) = γ+1), independently of how sigma_rel_of_gamma is written
    assert sigma_rel**2 * (gamma + 2) ** 2 * (gamma + 3) == pytest.approx(gamma + 1, rel=1e-12)

    # The weight each step's parameters get in the average, by running the update itself on one-hot
    # "parameters": after t steps, w_τ is the weight of step τ. Their spread, measured at the cells'
    # midpoints τ − 1/2, is the profile's std up to moving each mass within its unit cell, which changes
    # a std by at most 1/2 (std is 1-Lipschitz under coupling), so σ_rel is met within 1/(2t).
    t = 4000
    weights = np.zeros(t)
    for step in range(1, t + 1):
        beta = power_ema_decay(step, gamma)
        weights *= beta
        weights[step - 1] += 1 - beta
    midpoints = np.arange(1, t + 1) - 0.5
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    mean = weights @ midpoints
    measured = math.sqrt(weights @ (midpoints - mean) ** 2) / t
    assert abs(measured - sigma_rel) <= 1 / (2 * t)


def test_the_published_pair_and_the_longest_ema():
    # EDM2 Sec. 3.2 tracks σ_rel 0.05 and 0.10, which it states as γ 16.97 and 6.94.
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)
    # the peak of σ_rel(γ) is where its derivative vanishes: neighbours on both sides are lower
    assert sigma_rel_of_gamma(GAMMA_AT_PEAK - 1e-3) < SIGMA_REL_MAX > sigma_rel_of_gamma(GAMMA_AT_PEAK + 1e-3)
    for bad in (0.0, -0.1, SIGMA_REL_MAX + 1e-3, 0.5):
        with pytest.raises(UserError, match="σ_rel must be in"):
            gamma_of_sigma_rel(bad)


# ----------------------------------------------------------------------------------------------
# the least-squares reconstruction on a synthetic training run
# ----------------------------------------------------------------------------------------------

STORED, EVERY, STEPS = (0.05, 0.10), 50, 1000


def synthetic_run(extra_sigma_rels=()):
    """A random walk of 72 float64 weights (a Linear layer) over STEPS steps, averaged by the training
    code's own PowerEMAs: the stored pair (snapshots every EVERY steps) and, tracked directly, the
    extra lengths. Returns (snapshots [(step, γ, weights)], {σ_rel: directly tracked average at the
    end}, the walk (STEPS, 72))."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(8, 8, dtype=torch.float64)
    emas = PowerEMAs(model, STORED + tuple(extra_sigma_rels))
    start = torch.randn(72, generator=generator, dtype=torch.float64)
    walk = start + torch.cumsum(0.05 * torch.randn(STEPS, 72, generator=generator, dtype=torch.float64), dim=0)
    snapshots = []
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(walk[step - 1], model.parameters())
        emas.update(model, step)
        if step % EVERY == 0:
            snapshots += [(step, gamma, torch.nn.utils.parameters_to_vector(ema.parameters()).clone())
                          for ema, gamma in zip(emas.modules[:2], emas.gammas[:2])]
    direct = {s: torch.nn.utils.parameters_to_vector(ema.parameters())
              for s, ema in zip(emas.sigma_rels[2:], emas.modules[2:])}
    return snapshots, direct, walk


def combine(snapshots, step, gamma):
    fit = fit_profile([s[0] for s in snapshots], [s[1] for s in snapshots], step, gamma)
    return fit, sum(float(x) * weights for x, (_, _, weights) in zip(fit.weights, snapshots))


def test_reconstructing_a_stored_profile_returns_it():
    snapshots, _, _ = synthetic_run()
    for index in (0, 9, 19, len(snapshots) - 1):  # σ_rel 0.05 at step 50, 0.10 at 250, 0.10 at 500, 0.10 at the end
        step, gamma, stored = snapshots[index]
        fit, rebuilt = combine(snapshots, step, gamma)
        unit = np.zeros(len(snapshots))
        unit[index] = 1
        off = float(np.abs(fit.weights - unit).sum())
        assert off < 1e-6 and fit.relative_error < 1e-6
        # Σ_j x_j θ̂_j − θ̂_i = Σ_j (x_j − δ_ij) θ̂_j, at most ‖x − e_i‖₁ max|θ̂| away, plus the float64
        # rounding of a 40-term sum (≤ 40 · 2^-53 · Σ|x_j||θ̂_j| < 1e-13 max|θ̂|).
        largest = max(s[2].abs().max().item() for s in snapshots)
        assert (rebuilt - stored).abs().max().item() <= (off + 1e-13) * largest


@pytest.mark.parametrize("sigma_rel", [0.075, 0.2], ids=["between the stored", "longer than both"])
def test_reconstruction_matches_the_directly_tracked_ema_within_the_fit_bound(sigma_rel):
    snapshots, direct, walk = synthetic_run([sigma_rel])
    fit, rebuilt = combine(snapshots, STEPS, gamma_of_sigma_rel(sigma_rel))
    # The bound (fastdit.power_ema): every step's weight in an EMA is its profile's integral over that
    # step's unit cell, so reconstruction − direct = Σ_τ e_τ θ_τ with e_τ = ∫_{τ−1}^{τ} r and r the fit's
    # residual profile. Σ_τ e_τ = ∫ r = Σ x_i − 1 (each profile has mass 1); with c the walk's mean per
    # weight, |Σ e_τ θ_τ| ≤ |Σ x_i − 1| |c| + ‖e‖₂ ‖θ − c‖₂ and ‖e‖₂ ≤ ‖r‖_{L2} (Jensen on unit cells).
    # Float64 rounding of the sums adds < 1e-12 of the largest weight.
    centre = walk.mean(dim=0)
    bound = (abs(fit.weights.sum() - 1) * centre.abs() + fit.residual * (walk - centre).norm(dim=0)
             + 1e-12 * walk.abs().max())
    error = (rebuilt - direct[sigma_rel]).abs()
    assert (error <= bound).all(), f"{int((error > bound).sum())} weights outside the bound"
    # Not vacuous: the bound is far tighter than the gap to the nearest stored average at that step.
    nearest = min(snapshots[-2:], key=lambda s: abs(sigma_rel_of_gamma(s[1]) - sigma_rel))[2]
    assert bound.norm() < 0.1 * (direct[sigma_rel] - nearest).norm()


# ----------------------------------------------------------------------------------------------
# train --posthoc-ema and fastdit ema
# ----------------------------------------------------------------------------------------------


def test_sigkill_and_rerun_with_posthoc_ema_is_bit_identical(tmp_path):
    fields = dict(posthoc_ema=True, posthoc_every=3, max_steps=8, ckpt_every=2)
    reference = train(tiny_config(tmp_path / "reference", **fields))
    command = [sys.executable, "-m", "fastdit", "train", *TINY, *POSTHOC, "--max-steps", "8", "--ckpt-every", "2",
               "--results-dir", str(tmp_path / "killed")]
    run_dir = tmp_path / "killed" / reference.run_dir.name
    kill_once_checkpointed(command, run_dir, step=4, last=8)
    subprocess.run(command, check=True, capture_output=True)

    resumed, uninterrupted = final_state(run_dir), final_state(reference.run_dir)
    assert len(uninterrupted["posthoc_ema"]) == 2
    for a, b in zip(resumed["posthoc_ema"], uninterrupted["posthoc_ema"]):
        assert_same_tensors(a, b)
    assert_same_tensors(resumed["model"], uninterrupted["model"])
    # Snapshots every 3 steps and at the end, each the average of its step, identical in both runs.
    names = sorted(p.name for p in (reference.run_dir / "posthoc_ema").iterdir())
    assert names == [f"000000{s}-sigma{r}.safetensors" for s in (3, 6, 8) for r in ("0.05", "0.1")]
    assert sorted(p.name for p in (run_dir / "posthoc_ema").iterdir()) == names
    for name in names:
        assert_same_tensors(load_file(run_dir / "posthoc_ema" / name), load_file(reference.run_dir / "posthoc_ema" / name))
    assert_same_tensors(load_file(reference.run_dir / "posthoc_ema" / "0000008-sigma0.1.safetensors"),
                        uninterrupted["posthoc_ema"][1])


def test_fastdit_ema_writes_an_export_that_samples(tmp_path, capsys):
    result = train(tiny_config(tmp_path, posthoc_ema=True, posthoc_every=2, max_steps=6, ckpt_every=6))
    run = result.run_dir
    assert [(s.step, s.sigma_rel) for s in list_snapshots(run)] == [(t, r) for t in (2, 4, 6) for r in (0.05, 0.1)]

    # A stored profile comes back from the files as stored (float32 snapshots, combined in float64:
    # ‖x − e_i‖₁ max|θ̂| plus one float32 rounding).
    rebuilt = reconstruct_ema(run, 0.05, step=4)
    unit = np.eye(6)[2]
    off = float(np.abs(rebuilt.fit.weights - unit).sum())
    stored = load_file(run / "posthoc_ema" / "0000004-sigma0.05.safetensors")
    for name, value in stored.items():
        limit = off * value.abs().max().item() + 2**-24 * value.abs().max().item()
        assert (rebuilt.weights[name] - value).abs().max().item() <= limit + 1e-30, name

    assert main(["ema", "--run", str(run), "--sigma-rel", "0.07"]) == 0
    out = run / "checkpoints" / "0000006-ema-sigma0.07.safetensors"
    assert str(out) in capsys.readouterr().out
    # The same layout as the run's own EMA export: what `fastdit sample` and the official DiT code load.
    assert load_file(out).keys() == load_file(result.export).keys()
    model, info = load_model(out)
    assert info.latent.kind == "pixels" and model.config.depth == 2
    grid = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(out), "--num-sampling-steps", "3", "--out", str(grid), "--no-progress"]) == 0
    assert grid.is_file()


@pytest.mark.parametrize("flags, message", [
    (["--sigma-rel", "0.5"], "--sigma-rel must be in [0.001, 0.300]"),
    (["--sigma-rel", "0.1", "--step", "7"], "--step 7 is outside the stored snapshots (steps 1..2)"),
    (["--sigma-rel", "0.1", "--out", "x.png"], "should end in .safetensors"),
])
def test_fastdit_ema_refuses_bad_requests_in_one_line(tmp_path, capsys, flags, message):
    run = train(tiny_config(tmp_path, posthoc_ema=True, posthoc_every=2, max_steps=2, ckpt_every=2)).run_dir
    with pytest.raises(SystemExit) as exit_:
        main(["ema", "--run", str(run), *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_fastdit_ema_without_snapshots_and_bad_training_flags(tmp_path, capsys):
    plain = train(tiny_config(tmp_path / "plain", max_steps=1)).run_dir
    with pytest.raises(SystemExit):
        main(["ema", "--run", str(plain), "--sigma-rel", "0.1"])
    assert "holds no post-hoc EMA snapshots (posthoc_ema/); train with --posthoc-ema" in capsys.readouterr().err
    for flags, message in ((["--posthoc-sigma-rels", "0.05", "0.4"], "--posthoc-sigma-rels must be in [0.001, 0.300]"),
                           (["--posthoc-sigma-rels", "0.1", "0.1"], "needs two different lengths"),
                           (["--posthoc-every", "0"], "--posthoc-every must be >= 1")):
        with pytest.raises(SystemExit):
            main(["train", *TINY, *POSTHOC, "--results-dir", str(tmp_path / "runs"), "--max-steps", "1", *flags])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_snapshots_are_thinned_evenly_to_the_kept_count_and_a_resume_keeps_the_same(tmp_path):
    from fastdit.train.posthoc_ema import kept_steps, list_snapshots

    # A function of the step alone: multiples of every·2^k, and the newest step.
    assert kept_steps(10, 1, 4) == {4, 8, 10}
    assert kept_steps(8, 1, 4) == {2, 4, 6, 8}
    assert kept_steps(3, 1, 64) == {1, 2, 3}
    assert kept_steps(7_000_000, 5000, 64) <= set(range(5000, 7_000_001, 5000)) | {7_000_000}
    assert len(kept_steps(7_000_000, 5000, 64)) <= 64
    fields = dict(posthoc_ema=True, posthoc_every=1, posthoc_keep=4, ckpt_every=5)
    reference = train(tiny_config(tmp_path / "reference", max_steps=10, **fields))
    assert sorted({s.step for s in list_snapshots(reference.run_dir)}) == [4, 8, 10]
    # Resumed at step 5: steps 6..10 again; the run keeps what the uninterrupted one keeps.
    train(tiny_config(tmp_path / "resumed", max_steps=5, **fields))
    resumed = train(tiny_config(tmp_path / "resumed", max_steps=10, **fields))
    assert sorted(p.name for p in (resumed.run_dir / "posthoc_ema").iterdir()) == \
        sorted(p.name for p in (reference.run_dir / "posthoc_ema").iterdir())
