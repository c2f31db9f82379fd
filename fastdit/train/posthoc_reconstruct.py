"""`fastdit ema`: the EMA of any length σ_rel, at any step up to the last snapshot, from the snapshots
`train --posthoc-ema` stored (EDM2, Karras et al. 2024, App. C.3).

The weights x of the snapshots come from `fastdit.power_ema.fit_profile`; the average is Σ_i x_i θ̂_i,
accumulated one snapshot at a time in float64 (neighbouring profiles are nearly parallel, so the x_i
can be large with opposite signs, and float32 sums would lose the difference), then stored in the
snapshots' own dtype. Memory: the float64 sum and one snapshot, 3x the weights in float32 (8 GB for
DiT-XL/2), whatever the number of snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import read_checkpoint
from ..errors import UserError
from ..power_ema import SIGMA_REL_MAX, ProfileFit, fit_profile, gamma_of_sigma_rel
from .posthoc_ema import SNAPSHOT_FOLDER, Snapshot, list_snapshots


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


def reconstruct_ema(run_dir: str | Path, sigma_rel: float, step: int | None = None) -> Reconstruction:
    """The power-function EMA of length `sigma_rel` after `step` optimizer steps (default: the last
    snapshot's), combined from every stored snapshot."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {str(run_dir)!r} does not exist; pass the folder `fastdit train` wrote")
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise UserError(f"--sigma-rel must be in (0, {SIGMA_REL_MAX:.3f}] (the longest power-function EMA), got "
                        f"{sigma_rel:g}; EDM2's best lengths lie between 0.05 and 0.15")
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
    total, model_info, dtypes = None, None, None
    for snapshot, weight in zip(snapshots, fit.weights):
        state, model_info = read_checkpoint(snapshot.path)
        if total is None:
            dtypes = {name: value.dtype for name, value in state.items()}
            total = {name: torch.zeros(value.shape, dtype=torch.float64) for name, value in state.items()}
        if state.keys() != total.keys():
            raise UserError(f"{str(snapshot.path)!r} holds other weights than {str(snapshots[0].path)!r}; "
                            f"the snapshot folder mixes runs")
        for name, value in state.items():
            total[name].add_(value.double(), alpha=float(weight))
    weights = {name: value.to(dtypes[name]) for name, value in total.items()}
    return Reconstruction(weights, model_info, step, sigma_rel, gamma, fit, snapshots)


def default_output(run_dir: Path, step: int, sigma_rel: float) -> Path:
    """Beside the run's own EMA exports: checkpoints/0001000-ema-sigma0.08.safetensors."""
    return Path(run_dir) / "checkpoints" / f"{step:07d}-ema-sigma{sigma_rel:g}.safetensors"
