"""Metrics to the console, to `metrics.jsonl` in the run folder, to TensorBoard event files, and
optionally to Weights & Biases. Only the main process logs."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..io import append_text, atomic_write_text
from ..program import install_command


# What a training record of metrics.jsonl holds besides "step" and the objective's named loss terms
# ("loss", the one optimised, and "mse", "vb", "repa", ...): how fast and how large the window was.
# Evaluation records hold "eval/..." keys instead.
STEP_STATISTICS = ("grad_norm", "skipped_steps", "steps_per_sec", "images_per_sec", "peak_memory_gb", "lr", "epoch")


def loss_terms(record: dict) -> dict[str, float]:
    """The named loss terms of one metrics.jsonl record ({} for an evaluation record)."""
    return {name: float(value) for name, value in record.items()
            if name != "step" and name not in STEP_STATISTICS and "/" not in name}


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class StepWindow:
    """The steps since the last log line: each loss term and the gradient norm summed over the steps
    that updated, how many were skipped (non-finite), and since when: one record of metrics.jsonl.
    Summed on the device: adding a step reads nothing on the host (`counts` and `means` do)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.running, self.updates, self.skipped = None, None, None
        self.start = time.perf_counter()

    def add(self, result) -> None:
        """A step's `StepResult` (`fastdit.train.step`): device tensors."""
        taken = ~result.skipped
        # A skipped step's terms are not finite: masked out, not multiplied by 0 (inf · 0 is nan).
        own = {} if result.objective_loss is None else {"objective_loss": result.objective_loss}
        update = {name: torch.where(taken, value, torch.zeros_like(value))
                  for name, value in {**result.terms, **own, "grad_norm": result.grad_norm}.items()}
        if self.running is None:
            self.running, self.updates, self.skipped = update, taken.long(), result.skipped.long()
            return
        self.running = {name: self.running[name] + value for name, value in update.items()}
        self.updates, self.skipped = self.updates + taken.long(), self.skipped + result.skipped.long()

    def counts(self) -> tuple[int, int]:
        """(steps that updated, steps skipped) in the window."""
        return (0, 0) if self.running is None else (int(self.updates), int(self.skipped))

    def means(self) -> dict[str, float]:
        """"loss", the other terms ("mse", "vb", "repa", ...) and "grad_norm" (before clipping), averaged
        over the window's updates; a window of skipped steps only has none."""
        updates, _ = self.counts()
        if not updates:
            return {}
        return {name: (value / updates).item() for name, value in self.running.items()}


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, wandb: bool, config: dict, start_step: int = 0):
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        drop_metrics_after(self.metrics_path, start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:
                self.info(f"tensorboard is not installed ({install_command('train')}); logging to metrics.jsonl only")
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise_missing_wandb()
            self.wandb = wandb_module.init(project="fastdit", name=run_dir.name, config=config, dir=str(run_dir), resume="allow")

    def info(self, message: str) -> None:
        if self.enabled:
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp}] {message}", file=sys.stdout, flush=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        append_text(json.dumps({"step": step, **values}) + "\n", self.metrics_path)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"train/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def window(self, step: int, window: StepWindow, *, global_batch: int, lr: float, epoch: int,
               device: torch.device, progress=None) -> dict[str, float]:
        """Log the steps of `window` as step `step`'s record (and a console line, or the progress bar's
        figures), start the next window, and return the window's mean terms."""
        means, (updates, skipped) = window.means(), window.counts()
        elapsed = time.perf_counter() - window.start
        steps = updates + skipped
        values = {  # the keys beside the terms are STEP_STATISTICS
            **means,
            "skipped_steps": skipped,
            "steps_per_sec": steps / elapsed,
            "images_per_sec": steps * global_batch / elapsed,
            "peak_memory_gb": peak_memory_gb(device),
            "lr": lr,
            "epoch": epoch,
        }
        self.metrics(step, values)
        others = {name: value for name, value in means.items() if name not in ("loss", "grad_norm")}
        terms_text = " ".join(f"{name} {value:.4f}" for name, value in others.items())
        if progress is not None:
            progress.set_postfix({name: f"{value:.4f}" for name, value in means.items()})
        elif means:
            self.info(
                f"step {step:07d}  loss {means['loss']:.4f}{f' ({terms_text})' if terms_text else ''}  "
                f"grad norm {means['grad_norm']:.4f}  "
                f"{values['steps_per_sec']:.2f} steps/s  {values['images_per_sec']:.1f} img/s  "
                f"peak mem {values['peak_memory_gb']:.2f} GB"
                + (f"  ({skipped} skipped)" if skipped else "")
            )
        window.reset()
        return means

    def image(self, step: int, tag: str, image_hwc) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def drop_metrics_after(path: Path, step: int) -> None:
    """A run resumed from the checkpoint of `step` logs the steps after it again: drop the records a
    killed run wrote past its last checkpoint (and a line it was killed while writing)."""
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder, where the run's metrics file belongs; move it away and resume")
    if not path.is_file():
        return
    kept = []
    # Bytes, decoded line by line: a damaged line (not UTF-8, not JSON, not a record) is dropped, not fatal.
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except (ValueError, RecursionError):  # not UTF-8, not JSON (both ValueErrors), or nested past the limit
            continue
        if isinstance(record, dict) and type(record.get("step")) is int and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text("".join(kept), path)


def raise_missing_wandb():
    raise UserError(f"--wandb needs the wandb package: {install_command('wandb')}")
