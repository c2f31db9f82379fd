"""`train --posthoc-ema`: two power-function EMAs tracked beside the model, and their snapshots.

EDM2 (Karras et al. 2024, Sec. 3) keeps two averages with different lengths σ_rel during training and
stores both every N steps; any other length, at any stored step, is then a least-squares combination of
the snapshots (`fastdit.power_ema`, `fastdit ema`). The averages are part of the training state (a
resumed run continues them bit-exactly) and are sharded like the model under FSDP; the snapshots are
EMA exports in the run folder, `posthoc_ema/0001000-sigma0.05.safetensors`, each loadable by `fastdit
sample` as it is and carrying its step, σ_rel and γ in its metadata.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from ..checkpoint import export_weights
from ..errors import UserError
from ..io import check_regular_file
from ..model_info import ModelInfo
from ..power_ema import SIGMA_REL_MAX, gamma_of_sigma_rel, power_ema_decay
from .ema import make_ema, update_ema

SNAPSHOT_FOLDER = "posthoc_ema"
SNAPSHOT_KEY = "posthoc_ema_snapshot"  # the metadata entry that marks a file as a snapshot
_SNAPSHOT_NAME = re.compile(r"^(\d{7,})-sigma[0-9.e-]+\.safetensors$")
# The shortest EMA length taken: σ_rel ≈ 1/γ for short ones, and at σ_rel 0.001 (γ ≈ 1000) the profiles of
# snapshots a few percent of the run apart already overlap by less than float64 resolves, so a shorter
# length could neither be tracked usefully nor combined (its profiles underflow to zero).
SIGMA_REL_MIN = 1e-3


def check_sigma_rel(value, flag: str) -> None:
    """A UserError naming `flag` unless `value` is an EMA length σ_rel fastdit can track and combine."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not SIGMA_REL_MIN <= value <= SIGMA_REL_MAX):
        raise UserError(f"{flag} must be in [{SIGMA_REL_MIN:g}, {SIGMA_REL_MAX:.3f}] (shorter profiles underflow "
                        f"float64, and no power-function EMA is longer), got {value!r}; EDM2's best lengths lie "
                        f"between 0.05 and 0.15")


class PowerEMAs:
    """One power-function EMA per σ_rel, updated after every optimizer step."""

    def __init__(self, model: torch.nn.Module, sigma_rels: tuple[float, ...]):
        for sigma_rel in sigma_rels:
            check_sigma_rel(sigma_rel, "--posthoc-sigma-rels")
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = tuple(gamma_of_sigma_rel(s) for s in self.sigma_rels)
        self.modules = [make_ema(model) for _ in self.sigma_rels]  # copies of the plain model, before wrapping

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, taken: torch.Tensor | float = 1.0) -> None:
        """After optimizer step `step` (counted from 1): θ̂ ← β θ̂ + (1 − β) θ with β = (1 − 1/step)^(γ+1);
        `taken` (1 or 0, a device scalar) scales the move, so a skipped step moves nothing."""
        for ema, gamma in zip(self.modules, self.gammas):
            update_ema(ema, model, (1 - power_ema_decay(step, gamma)) * taken)

    def state_dict(self, options: StateDictOptions) -> list[dict]:
        """Each average's full state dict (under FSDP every process must call this; rank 0 receives them)."""
        return [get_model_state_dict(ema, options=options) for ema in self.modules]

    def load_state_dict(self, states: list[dict], options: StateDictOptions) -> None:
        from ..state_dicts import describe_mismatch

        if not isinstance(states, list) or not all(isinstance(state, dict) for state in states):
            raise UserError("the checkpoint's post-hoc EMA section (posthoc_ema) is not a list of weights; restore "
                            "the checkpoint, or pass another --run-name")
        if len(states) != len(self.modules):
            raise UserError(f"the checkpoint holds {len(states)} post-hoc EMAs, this run keeps {len(self.modules)}")
        for ema, state in zip(self.modules, states):
            # Empty on the processes that get the weights broadcast from rank 0; checked where they are.
            if not all(isinstance(value, torch.Tensor) for value in state.values()):
                raise UserError("the checkpoint's post-hoc EMAs hold entries that are not weights; restore the "
                                "checkpoint, or pass another --run-name")
            problem = state and describe_mismatch(ema.state_dict(), state)
            if problem:
                raise UserError(f"the checkpoint's post-hoc EMAs do not fit the model ({problem}); restore the "
                                f"checkpoint, or pass another --run-name")
            set_model_state_dict(ema, state, options=options)


def snapshot_folder(run_dir: Path) -> Path:
    return Path(run_dir) / SNAPSHOT_FOLDER


def snapshot_path(run_dir: Path, step: int, sigma_rel: float) -> Path:
    return snapshot_folder(run_dir) / f"{step:07d}-sigma{sigma_rel:g}.safetensors"


def save_snapshots(run_dir: Path, states: list[dict], emas: PowerEMAs, step: int, model_info: ModelInfo) -> list[Path]:
    """Write each average's gathered weights at `step` as an export (atomically, like every export)."""
    paths = []
    for state, sigma_rel, gamma in zip(states, emas.sigma_rels, emas.gammas):
        record = {"step": step, "sigma_rel": sigma_rel, "gamma": gamma}
        paths.append(export_weights(state, model_info, snapshot_path(run_dir, step, sigma_rel),
                                    extra={SNAPSHOT_KEY: record}))
    return paths


def kept_steps(step: int, every: int, keep: int) -> set[int]:
    """The snapshot steps a run keeps at step `step` with snapshots every `every` steps, at most `keep`:
    the multiples of every·2^k up to `step`, k the smallest that leaves no more than `keep` with `step`
    itself (its snapshot is the newest). Thinned evenly over the whole run, as the least-squares
    reconstruction wants its snapshots (EDM2 spreads them evenly), and a function of the step alone, so
    a resumed run keeps the files an uninterrupted one keeps."""
    interval = every
    while True:
        kept = set(range(interval, step + 1, interval)) | {step}
        if len(kept) <= keep:
            return kept
        interval *= 2


def prune_snapshots(run_dir: Path, step: int, every: int, keep: int) -> list[Path]:
    """Delete the snapshots of steps up to `step` that `kept_steps` drops; returns the deleted files.
    Snapshots past `step` (written by a killed run beyond its last checkpoint) are left: the resumed
    run writes them again."""
    folder, kept, removed = snapshot_folder(run_dir), kept_steps(step, every, keep), []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _SNAPSHOT_NAME.match(path.name)
        if match and int(match.group(1)) <= step and int(match.group(1)) not in kept:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int  # optimizer steps averaged
    sigma_rel: float
    gamma: float


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """The run's snapshots, by step then σ_rel, read from their metadata (only the headers are read);
    a UserError naming the file for one that is not a snapshot or whose record is malformed."""
    from safetensors import SafetensorError, safe_open

    folder = snapshot_folder(run_dir)
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _SNAPSHOT_NAME.match(path.name)
        if not match:
            continue
        check_regular_file(path, "post-hoc EMA snapshot")
        try:
            with safe_open(str(path), framework="pt") as handle:
                record = json.loads((handle.metadata() or {})[SNAPSHOT_KEY])
        except (SafetensorError, OSError, KeyError, ValueError, RecursionError) as err:
            raise UserError(f"{str(path)!r} is not a readable post-hoc EMA snapshot ({type(err).__name__}); "
                            f"move it out of {str(folder)!r}") from None
        problem = _record_problem(record, int(match.group(1)))
        if problem:
            raise UserError(f"{str(path)!r} is not a post-hoc EMA snapshot fastdit wrote ({problem}); move it out of "
                            f"{str(folder)!r}")
        found.append(Snapshot(path, record["step"], float(record["sigma_rel"]), float(record["gamma"])))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def _record_problem(record, step_in_name: int) -> str:
    """What is wrong with a snapshot's record ("" when nothing): the step it names, a σ_rel fastdit tracks,
    and the γ of that σ_rel, which the reconstruction reads."""
    if not isinstance(record, dict):
        return f"its record is a {type(record).__name__}, not an object"
    step, sigma_rel, gamma = record.get("step"), record.get("sigma_rel"), record.get("gamma")
    if type(step) is not int or step != step_in_name:
        return f"its record's step {step!r} is not the step {step_in_name} its name gives"
    try:
        check_sigma_rel(sigma_rel, "sigma_rel")
    except UserError:
        return f"its record's sigma_rel {sigma_rel!r} is no EMA length"
    if (isinstance(gamma, bool) or not isinstance(gamma, numbers.Real)
            or not math.isclose(gamma, gamma_of_sigma_rel(float(sigma_rel)), rel_tol=1e-9)):
        return f"its record's gamma {gamma!r} is not the γ of σ_rel {sigma_rel:g}"
    return ""
