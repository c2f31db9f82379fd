"""`fastdit ema`: the EMA of any length σ_rel, at any step up to the last snapshot, from the snapshots
`train --posthoc-ema` stored (EDM2, Karras et al. 2024, App. C.3).

The weights x of the snapshots come from `fastdit.power_ema.fit_profile`; the average is Σ_i x_i θ̂_i,
accumulated one snapshot at a time in float64 (neighbouring profiles are nearly parallel, so the x_i
can be large with opposite signs, and float32 sums would lose the difference), then stored in the
snapshots' own dtype. Memory: the float64 sum and one snapshot, 3x the weights in float32 (8 GB for
DiT-XL/2), whatever the number of snapshots.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import check_fits_before_building, read_checkpoint
from ..errors import UserError
from ..model_info import ModelInfo
from ..power_ema import ProfileFit, fit_profile, gamma_of_sigma_rel
from .posthoc_ema import SNAPSHOT_FOLDER, Snapshot, check_sigma_rel, list_snapshots, snapshot_folder

RECONSTRUCTION_KEY = "posthoc_ema_reconstruction"  # the metadata entry that marks a `fastdit ema` export
# The fit's relative L2 error above which an export is refused unless asked for (--max-fit-error): the
# combination is then a visibly different average from the one asked for (EDM2's reconstructions of
# lengths between the tracked ones, at snapshot steps, fit within a few percent).
MAX_FIT_ERROR = 0.1


@dataclass
class Reconstruction:
    weights: dict[str, torch.Tensor]
    model_info: dict  # the snapshots' ModelInfo record
    step: int
    sigma_rel: float
    gamma: float
    fit: ProfileFit
    snapshots: list[Snapshot]

    @property
    def record(self) -> dict:
        """What the export's metadata says about how it was made."""
        return {"step": self.step, "sigma_rel": self.sigma_rel, "gamma": self.gamma,
                "snapshots": len(self.snapshots), "relative_fit_error": self.fit.relative_error}


def reconstruct_ema(run_dir: str | Path, sigma_rel: float, step: int | None = None, *,
                    max_fit_error: float = MAX_FIT_ERROR) -> Reconstruction:
    """The power-function EMA of length `sigma_rel` after `step` optimizer steps (default: the last
    snapshot's), combined from every stored snapshot.

    Refused, in one line, before a weight is read: a length outside what can be tracked, a step outside
    the snapshots, and a fit whose relative error exceeds `max_fit_error` (the result would not be the
    EMA asked for). Then every snapshot must be a finite export of the same model, and so must the result."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {str(run_dir)!r} does not exist; pass the folder `fastdit train` wrote")
    check_sigma_rel(sigma_rel, "--sigma-rel")
    if isinstance(max_fit_error, bool) or not (isinstance(max_fit_error, (int, float)) and 0 < max_fit_error <= 1):
        raise UserError(f"--max-fit-error must be in (0, 1] (a relative L2 error), got {max_fit_error!r}")
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise UserError(f"{str(run_dir)!r} holds no post-hoc EMA snapshots ({SNAPSHOT_FOLDER}/); train with "
                        f"--posthoc-ema to store them")
    last = snapshots[-1].step
    step = last if step is None else step
    if not 1 <= step <= last:
        raise UserError(f"--step {step} is outside the stored snapshots (steps 1..{last}); pass --step {last} or less")
    gamma = gamma_of_sigma_rel(sigma_rel)
    fit = fit_profile([s.step for s in snapshots], [s.gamma for s in snapshots], step, gamma)
    if not math.isfinite(fit.relative_error) or not all(math.isfinite(float(w)) for w in fit.weights):
        raise UserError(f"the snapshots' profiles cannot be combined into σ_rel {sigma_rel:g} at step {step} (the fit "
                        f"is not finite); pass a σ_rel nearer the tracked ones")
    if fit.relative_error > max_fit_error:
        raise UserError(_poor_fit_message(snapshots, sigma_rel, step, fit.relative_error, max_fit_error))
    total, reference, dtypes = None, None, None
    for snapshot, weight in zip(snapshots, fit.weights):
        state, model_info = read_checkpoint(snapshot.path)
        _check_snapshot(snapshot, state, model_info, reference)
        if total is None:
            reference = (snapshot, model_info, {name: (value.shape, value.dtype) for name, value in state.items()})
            dtypes = {name: value.dtype for name, value in state.items()}
            total = {name: torch.zeros(value.shape, dtype=torch.float64) for name, value in state.items()}
        for name, value in state.items():
            total[name].add_(value.double(), alpha=float(weight))
    weights = {name: value.to(dtypes[name]) for name, value in total.items()}
    for name, value in weights.items():
        if not torch.isfinite(value).all():
            raise UserError(f"the EMA of σ_rel {sigma_rel:g} at step {step} has non-finite weights in {name!r} (the "
                            f"combination overflows {str(dtypes[name]).replace('torch.', '')}); nothing was written: "
                            f"pass a σ_rel nearer the tracked ones or a snapshot step")
    return Reconstruction(weights, reference[1], step, sigma_rel, gamma, fit, snapshots)


def _poor_fit_message(snapshots: list[Snapshot], sigma_rel: float, step: int, error: float, limit: float) -> str:
    steps = sorted({s.step for s in snapshots})
    nearest = min(steps, key=lambda t: abs(t - step))
    tracked = " and ".join(f"{s:g}" for s in sorted({s.sigma_rel for s in snapshots}))
    return (f"the snapshots form the EMA of σ_rel {sigma_rel:g} at step {step} only with a {error:.1%} profile error "
            f"(above --max-fit-error {limit:g}), so the export would not be that EMA; ask for a snapshot step (nearest: "
            f"{nearest}) or a σ_rel nearer the tracked {tracked}, or pass --max-fit-error {min(1.0, error * 1.01):.3g} "
            f"to write it anyway")


def _check_snapshot(snapshot: Snapshot, state: dict, model_info: dict | None, reference) -> None:
    """One snapshot's weights: a fastdit export whose record builds, whose tensors fit it and are finite
    floats, of the same model as the first snapshot (`reference`: (snapshot, record, {name: (shape, dtype)}))."""
    where = f"snapshot {str(snapshot.path)!r}"
    fix = f"move it out of {str(snapshot_folder(snapshot.path.parent.parent))!r} (the others are combined without it)"
    if model_info is None:
        raise UserError(f"{where} records no model; it is not an export fastdit wrote: {fix}")
    info = ModelInfo.from_dict(model_info, source=str(snapshot.path))
    check_fits_before_building(info.config, state, str(snapshot.path), recorded=True)
    for name, value in state.items():
        if not value.is_floating_point():
            raise UserError(f"{where} holds {str(value.dtype).replace('torch.', '')} values in {name!r}; snapshots hold "
                            f"float weights: {fix}")
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(f"{where} holds non-finite weights ({bad} NaN or inf value(s) in {name!r}): the run "
                            f"diverged before step {snapshot.step} or the file is damaged; {fix}, or pass an earlier "
                            f"--step")
    if reference is None:
        return
    first, first_info, layout = reference
    if model_info != first_info or {name: (v.shape, v.dtype) for name, v in state.items()} != layout:
        raise UserError(f"{where} holds another model than {str(first.path)!r} (its record or weights differ); the "
                        f"snapshot folder mixes runs: {fix}")


# A file the run writes into checkpoints/ (a training checkpoint, or its EMA export).
_RUN_FILE = re.compile(r"^\d{7,}(\.pt|-ema\.safetensors)$")


def check_output(run_dir: str | Path, out: str | Path) -> Path:
    """`out` if `fastdit ema` may write it; else a UserError. It never replaces a file the run owns (its
    snapshots, checkpoints and exports, the run's records) nor any other existing file except an earlier
    `fastdit ema` export, and writes nothing into the snapshot folder (a file there is read as a snapshot
    by every later `fastdit ema`)."""
    run_dir, out = Path(run_dir), Path(out)
    real = Path(_real(out))
    snapshots = Path(_real(snapshot_folder(run_dir)))
    if real.parent == snapshots or snapshots in real.parents:
        raise UserError(f"--out {str(out)!r} is in the run's snapshot folder {str(snapshot_folder(run_dir))!r}, which "
                        f"holds the snapshots alone; write the export elsewhere (default: the run's checkpoints/)")
    if real.parent == Path(_real(run_dir / "checkpoints")) and _RUN_FILE.match(real.name):
        raise UserError(f"--out {str(out)!r} is a name the run gives its own checkpoints and exports; choose another "
                        f"name (default: NNNNNNN-ema-sigmaS.safetensors)")
    if real.exists() and not _is_reconstruction(real):
        raise UserError(f"--out {str(out)!r} exists and is not an earlier `fastdit ema` export; it is left as it is: "
                        f"choose another file")
    return out


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _is_reconstruction(path: Path) -> bool:
    """True for a regular file with `fastdit ema`'s mark in its safetensors metadata."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return RECONSTRUCTION_KEY in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - any unreadable file is not one
        return False


def default_output(run_dir: Path, step: int, sigma_rel: float) -> Path:
    """Beside the run's own EMA exports: checkpoints/0001000-ema-sigma0.08.safetensors."""
    return Path(run_dir) / "checkpoints" / f"{step:07d}-ema-sigma{sigma_rel:g}.safetensors"
