"""The weights a sweep point samples: a training run's last EMA export, an EMA of any length made from
its post-hoc snapshots (`fastdit ema`'s reconstruction, EDM2), or an export given by its path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .space import Weights

WEIGHTS_FOLDER = "weights"  # inside the sweep's folder: the reconstructed EMAs


@dataclass(frozen=True)
class SweepSource:
    """What is swept: a training run folder (`run`) or one checkpoint (`ckpt`)."""

    run: Path | None = None
    ckpt: Path | None = None
    ema_step: int | None = None  # the step the reconstructed EMAs average up to (default: the last snapshot's)

    def __post_init__(self):
        if (self.run is None) == (self.ckpt is None):
            raise ValueError("a sweep source is a run folder or a checkpoint, one of them")

    def last_export(self) -> Path:
        """The run's newest EMA export (`checkpoints/NNNNNNN-ema.safetensors`), or the checkpoint."""
        if self.ckpt is not None:
            if not self.ckpt.is_file():
                raise UserError(f"--ckpt {str(self.ckpt)!r} is not a file")
            return self.ckpt
        from ..train.state import export_path, list_checkpoints

        if not self.run.is_dir():
            raise UserError(f"--run-dir {str(self.run)!r} is not a folder; pass the run folder `fastdit train` wrote")
        exports = [export_path(checkpoint) for checkpoint in list_checkpoints(self.run)]
        exports = [path for path in exports if path.is_file()]
        if not exports:
            raise UserError(f"{str(self.run)!r} holds no EMA export (checkpoints/NNNNNNN-ema.safetensors) yet; "
                            "let the run write a checkpoint first")
        return exports[-1]

    def snapshot_step(self) -> int:
        """The step the reconstructed EMAs average up to: --ema-step, else the last snapshot's."""
        from ..train.posthoc_ema import SNAPSHOT_FOLDER, list_snapshots

        if self.run is None:
            raise UserError("--ema with an EMA length needs --run-dir (the run folder with the post-hoc snapshots), "
                            "not --ckpt")
        snapshots = list_snapshots(self.run)
        if not snapshots:
            raise UserError(f"{str(self.run)!r} holds no post-hoc EMA snapshots ({SNAPSHOT_FOLDER}/): train with "
                            "--posthoc-ema (the demo: --posthoc-ema) to sweep EMA lengths, or sweep the exports "
                            "with --ema last or --ema FILE ...")
        return self.ema_step or snapshots[-1].step

    def identity(self) -> dict:
        """What the sweep's scores depend on besides the points: the weights it starts from. A run that
        trained on since (a newer export, newer snapshots) is another sweep."""
        if self.ckpt is not None:
            return {"ckpt": str(self.ckpt.resolve())}
        from ..train.posthoc_ema import list_snapshots

        snapshots = list_snapshots(self.run) if self.run.is_dir() else []
        return {"run": str(self.run.resolve()), "last_export": self.last_export().name,
                "snapshot_step": (self.ema_step or snapshots[-1].step) if snapshots else None}


def weights_path(weights: Weights, source: SweepSource, out: Path) -> Path:
    """Where the weights of `weights` are (or will be, for a reconstruction: `make_weights`)."""
    if weights.kind == "last":
        return source.last_export()
    if weights.kind == "file":
        path = Path(str(weights.value))
        if not path.is_file():
            raise UserError(f"--ema {str(path)!r} is not a file; give an EMA export (.safetensors) or a checkpoint")
        return path
    return out / WEIGHTS_FOLDER / f"ema-sigma{weights.value:g}-{source.snapshot_step():07d}.safetensors"


def make_weights(weights: Weights, source: SweepSource, out: Path) -> Path:
    """`weights_path`, made first when it is a reconstruction not made yet (written atomically, so a
    killed sweep leaves none half-written)."""
    path = weights_path(weights, source, out)
    if weights.kind == "sigma" and not path.is_file():
        from ..checkpoint import export_weights
        from ..model_info import ModelInfo
        from ..train.posthoc_reconstruct import reconstruct_ema

        rebuilt = reconstruct_ema(source.run, weights.value, source.snapshot_step())
        export_weights(rebuilt.weights, ModelInfo.from_dict(rebuilt.model_info, source=str(path)), path,
                       extra={"posthoc_ema_reconstruction": rebuilt.record})
        if rebuilt.fit.relative_error > 0.1:
            print(f"warning: EMA σ_rel {weights.value:g} fits the stored snapshots poorly (profile error "
                  f"{rebuilt.fit.relative_error:.0%}); its score says less", flush=True)
    return path
