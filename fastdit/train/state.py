"""Training checkpoints: everything needed to continue a run exactly, written atomically.

`checkpoints/0001000.pt` holds model, EMA, optimizer, grad-scaler, step, data position (epoch, step
in epoch), RNG states and the resolved config; `checkpoints/0001000-ema.safetensors` is the EMA-only
export that `fastdit sample --ckpt` loads. Both are written under temporary names and renamed, so a
crash, SIGKILL or full disk never damages the previous checkpoint. Only the last K are kept.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import TRAIN_FORMAT, ModelInfo, export_weights
from ..errors import UserError
from ..io import atomic_torch_save

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")


@dataclass
class Position:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{step:07d}.pt"


def export_path(checkpoint: Path) -> Path:
    """The EMA-only export written beside a training checkpoint."""
    return checkpoint.with_name(f"{checkpoint.stem}-ema.safetensors")


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def rng_state() -> dict:
    # numpy's state is stored as plain tensors and numbers so that weights_only loading can read it.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    run_dir: Path,
    *,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
    position: Position,
    config: dict,
    model_info: ModelInfo,
    keep_last: int,
) -> Path:
    path = checkpoint_path(run_dir, position.step)
    state = {
        "format": TRAIN_FORMAT,
        "version": 1,
        "model_info": model_info.to_dict(),
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "position": vars(position).copy(),
        "rng": rng_state(),
        "config": config,
    }
    # The checkpoint first, then its export; if the export fails, the new checkpoint goes too, so both
    # are there or neither (a SIGKILL in between leaves the checkpoint; resuming writes its export).
    atomic_torch_save(state, path)
    try:
        export_weights(ema, model_info, export_path(path))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
        export_path(old).unlink(missing_ok=True)
    return path


def load_training_state(path: Path) -> dict:
    """A training checkpoint's content, read without running pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any read failure means the file is not a whole checkpoint
        raise UserError(
            f"cannot read training checkpoint {str(path)!r} ({type(err).__name__}); move it away to resume "
            f"from the previous one"
        ) from None
    if state.get("format") != TRAIN_FORMAT:
        raise UserError(f"{str(path)!r} is not a fastdit training checkpoint")
    return state

