"""Training checkpoints: everything needed to continue a run exactly, written atomically.

`checkpoints/0001000.pt` holds the model, optimizer, grad-scaler, step, data position (epoch, step in
epoch), RNG states, the resolved config, and each training extension's state under its key (the EMA
under "ema", `fastdit.train.extensions`), as full (gathered) state dicts with plain parameter names: a
run under DDP and one under FSDP write the same file; `checkpoints/0001000-ema.safetensors` is the
EMA-only export that `fastdit sample --ckpt` loads. Both are written under temporary names and renamed,
so a crash, SIGKILL or full disk never damages the previous checkpoint. Only the last K are kept.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torch.distributed.fsdp import FSDPModule

from ..checkpoint import TRAIN_FORMAT, export_weights
from ..model_info import ModelInfo
from ..errors import UserError
from ..io import atomic_torch_save, check_regular_file
from ..models import build_from_config

if TYPE_CHECKING:
    from .config import TrainConfig
    from .extensions import TrainExtension

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")
# The entry of the average that runs export and sample (`fastdit.train.extensions.ema`).
EMA_KEY = "ema"


@dataclass
class Position:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0


@dataclass(frozen=True)
class StepLayout:
    """What a step needs beyond the config: this process's share of the global batch, where it runs,
    and the shape of the model's input (`encode`: images -> (mean, std) of the VAE posterior, when the
    data are images encoded during training)."""

    rank: int
    device: torch.device
    local_batch: int  # this process's share of the global batch
    micro_batch: int  # per forward; gradient accumulation when smaller than local_batch
    input_shape: tuple[int, ...]  # (C, H, W) of the model input
    encode: Callable | None = None


@dataclass
class TrainingState:
    """What a training step changes and a checkpoint restores, in one object."""

    model: torch.nn.Module  # the plain module (sharded in place under FSDP): official parameter names
    runnable: torch.nn.Module  # what a step calls: `model` checkpointed, compiled, DDP-wrapped as asked
    optimizer: torch.optim.Optimizer  # built over `model`'s parameters after the wrapping
    scaler: torch.amp.GradScaler  # disabled unless fp16
    config: TrainConfig  # the run's settings (not saved with the state: the checkpoint has its own copy)
    layout: StepLayout
    extensions: list[TrainExtension] = field(default_factory=list)  # in the order of their hooks
    position: Position = field(default_factory=Position)

    def extension(self, name: str) -> TrainExtension | None:
        """The run's extension registered as `name` ("ema", ...), None when the run has none."""
        return next((e for e in self.extensions if e.name == name), None)

    @property
    def ema(self) -> torch.nn.Module:
        """The EMA of the weights, which the run exports and samples (sharded like `model` under FSDP)."""
        return self.extension(EMA_KEY).module

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over the processes (FSDP2): then every process must run the same
        forwards, and gathering a state dict takes every process."""
        return isinstance(self.model, FSDPModule)

    @property
    def needs_images(self) -> bool:
        """Whether an extension needs the clean images of the batch (for a frozen image encoder)."""
        return any(e.needs_images for e in self.extensions)

    def checkpoint_keys(self) -> list[str]:
        """The entries a checkpoint of this run holds beyond the core ones, one per extension with state."""
        return [e.checkpoint_key for e in self.extensions if e.checkpoint_key]

    def state_dict(self) -> dict:
        """Full state dicts on the CPU, keyed by parameter name. Under FSDP every process must call this
        (it gathers the shards) and only rank 0 receives the tensors."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, optimizer = get_state_dict(self.model, self.optimizer, options=options)
        return {
            "model": model,
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "position": vars(self.position).copy(),
            **{e.checkpoint_key: e.state_dict(options) for e in self.extensions if e.checkpoint_key},
        }

    def gathered_ema(self) -> torch.nn.Module | None:
        """The EMA as one plain module on rank 0 (None elsewhere) for sampling. Without FSDP it is the
        EMA itself; under FSDP every process must call this (it gathers the shards)."""
        if not isinstance(self.ema, FSDPModule):
            return self.ema
        weights = get_model_state_dict(self.ema, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not weights:  # not rank 0
            return None
        ema = build_from_config(self.ema.config)
        ema.load_state_dict(weights)
        return ema.to(next(self.model.parameters()).device).eval()

    def load_state_dict(self, state: dict, *, from_rank0: bool = False) -> None:
        """Restore from a checkpoint's content. With `from_rank0` only rank 0 holds the tensors (the other
        processes pass the small entries with empty "model" and "optimizer" and no extension entries,
        `load_newest_for_all_ranks`) and they are broadcast to every process; FSDP keeps its shards."""
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
        if state.get("version", 1) == 1:  # optimizer state keyed by parameter index (unwrapped models only)
            set_model_state_dict(self.model, state["model"], options=options)
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            # In two calls: `set_state_dict` with both broadcasts the optimizer's entries from rank 0 while the
            # other processes, holding none, skip them (torch 2.13), and the job hangs.
            set_model_state_dict(self.model, state["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.position = Position(**state["position"])
        for extension in self.extensions:
            if extension.checkpoint_key:
                extension.load_state_dict(state.get(extension.checkpoint_key), options)


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
    """The global generators of the CPU side (torch, numpy, Python), for code outside fastdit's draws.

    No CUDA state: a training step's randomness comes from generators seeded per sample and step
    (`fastdit.train.step_noise`), never from the global CUDA generators, and their states are one per
    visible GPU, so restoring them on a resume with fewer GPUs visible (a SLURM allocation of another
    shape, one GPU to debug) would fail for nothing."""
    # numpy's state is stored as plain tensors and numbers so that weights_only loading can read it.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s generators; a "cuda" entry (checkpoints from before) is left alone."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])


def save_training_state(
    run_dir: Path, training_state: dict, *, config: dict, model_info: ModelInfo, keep_last: int
) -> Path:
    """Write `TrainingState.state_dict()` with this process's RNG states and the run config; then the
    EMA export; then drop all but the last `keep_last` checkpoints."""
    path = checkpoint_path(run_dir, training_state["position"]["step"])
    state = {
        "format": TRAIN_FORMAT,
        "version": 2,  # 2: optimizer state keyed by parameter name (1: by index)
        "model_info": model_info.to_dict(),
        **training_state,
        "rng": rng_state(),
        "config": config,
    }
    return save_checkpoint_pair(run_dir, path, state,
                                lambda target: export_weights(training_state[EMA_KEY], model_info, target),
                                keep_last=keep_last)


def save_checkpoint_pair(run_dir: Path, path: Path, content: dict, export: Callable[[Path], None], *,
                         keep_last: int) -> Path:
    """Write a training checkpoint's `content` to `path`, then its export (`export(export_path(path))`),
    then drop all but the last `keep_last` checkpoints of `run_dir` with their exports.

    The checkpoint first, then its export; if the export fails, the new checkpoint goes too, so both are
    there or neither (a SIGKILL in between leaves the checkpoint; resuming writes its export)."""
    atomic_torch_save(content, path)
    try:
        export(export_path(path))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
        export_path(old).unlink(missing_ok=True)
    return path


def load_training_state(path: Path) -> dict:
    """A training checkpoint's content, read without running pickled code, with every entry its run's
    config says it holds (an entry per training extension the run used)."""
    check_regular_file(path, "training checkpoint")  # a named pipe would block torch.load forever
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any read failure means the file is not a whole checkpoint
        raise UserError(
            f"cannot read training checkpoint {str(path)!r} ({type(err).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
        raise UserError(f"{str(path)!r} is not a fastdit training checkpoint")
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    position = state.get("position")
    if not missing and not (isinstance(position, dict) and all(type(position.get(k)) is int for k in vars(Position()))):
        missing = ["a whole position (step, epoch, step_in_epoch)"]
    if not missing:
        missing = [key for key in _extension_keys(state["config"]) if key not in state]
    if missing:
        raise UserError(f"training checkpoint {str(path)!r} is incomplete (no {', '.join(missing)})")
    return state


def load_newest_for_all_ranks(checkpoints: list[Path], dist, large: list[str]) -> tuple[int, dict, list[str], bool]:
    """`load_newest_training_state` for a job of one or many processes: rank 0 alone reads the file (an
    XL/2 checkpoint is 11-16 GB; 64 readers would move a terabyte) and tells the others which checkpoint
    it chose and its small entries (position, RNG, config, scaler); the `large` entries (besides the
    model and optimizer: the extensions') stay on rank 0 for `TrainingState.load_state_dict(...,
    from_rank0=True)` to broadcast. Returns (index, content, warnings, from_rank0). A problem is raised
    on every process alike. Checkpoints of format version 1 (optimizer state keyed by index) are read by
    every process, as before."""
    if not dist.is_distributed:
        return (*load_newest_training_state(checkpoints, is_main=True), False)
    import torch.distributed as torch_dist

    message, stored = [None], None
    if dist.is_main:
        try:
            index, stored, warnings = load_newest_training_state(checkpoints, is_main=True)
            small = {key: value for key, value in stored.items() if key not in ("model", "optimizer", *large)}
            message = [(index, small, warnings, stored.get("version", 1) == 1, None)]
        except UserError as err:
            message = [(None, None, None, None, str(err))]
    torch_dist.broadcast_object_list(message, src=0)
    index, small, warnings, legacy, problem = message[0]
    if problem is not None:
        raise UserError(problem)
    if legacy:
        return index, stored if dist.is_main else load_training_state(checkpoints[index]), warnings, False
    return index, stored if dist.is_main else {**small, "model": {}, "optimizer": {}}, warnings, True


def _extension_keys(config: dict) -> list[str]:
    """The entries of the training extensions a run with the recorded `config` used."""
    from .config import TrainConfig
    from .extensions import enabled_extensions

    return [cls.checkpoint_key for cls in enabled_extensions(TrainConfig.from_dict(config)) if cls.checkpoint_key]


_REQUIRED_KEYS = ("model", EMA_KEY, "optimizer", "position", "rng", "config")
DAMAGED_SUFFIX = ".damaged"


def load_newest_training_state(checkpoints: list[Path], *, is_main: bool,
                               load: Callable[[Path], dict] = load_training_state) -> tuple[int, dict, list[str]]:
    """(index in `checkpoints`, content, warnings) of the newest checkpoint that reads whole (`load`: a
    checkpoint's reader, which raises a UserError for one that does not).

    Why fall back rather than stop: checkpoints are written atomically, so a newer file that does not
    read (a disk error, a copy cut short) is damage from outside, and the previous checkpoint is a
    state the run really passed through; resuming from it retrains the steps in between exactly as
    before (every draw is a function of the seed and the step). The main process renames each damaged
    file to `<name>.damaged`: kept for inspection, but out of the list, so that pruning to the last
    K checkpoints can never delete the good ones and keep the damaged one. With none readable, the
    error names them all.
    """
    damaged = []
    for index in range(len(checkpoints) - 1, -1, -1):
        try:
            state = load(checkpoints[index])
        except UserError as err:
            damaged.append((checkpoints[index], str(err)))
            continue
        warnings = []
        for path, problem in damaged:  # renamed only now: with none readable, the files stay as they were
            if is_main:
                path.replace(path.with_name(path.name + DAMAGED_SUFFIX))
            warnings.append(f"warning: {problem}; renamed to {path.name + DAMAGED_SUFFIX}, resuming from "
                            f"{checkpoints[index].name}")
        return index, state, warnings
    problems = "; ".join(problem for _, problem in damaged)
    raise UserError(f"no training checkpoint of this run reads whole ({problems}); restore one, or pass "
                    f"another --run-name to start again")

