"""What a decoder-training step changes and a checkpoint restores, in one object, and the checkpoint files.

A checkpoint (`checkpoints/<step>.pt`, `torch.save`d, read back with weights_only=True) holds the decoder,
its EMA, the decoder's AdamW state, the discriminator heads and their AdamW state (when the run has a
discriminator), the position in the data, the latent statistics gathered so far, the global RNG states,
the run's config and the encoder's identity. Beside it, `<step>-ema.safetensors` is the EMA decoder alone
in RAE's key layout (`fastdit.decoder_training.export`). Both are written under temporary names and
renamed, the checkpoint first (`fastdit.train.state.save_checkpoint_pair`); the last K are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed
from ..errors import UserError
from ..io import check_regular_file
from ..train.state import Position

DECODER_TRAIN_FORMAT = "fastdit-decoder-training"
_REQUIRED_KEYS = ("decoder", "ema", "optimizer", "position", "token_stats", "rng", "config", "encoder")


class TokenStatistics:
    """Per-element sums of the clean encoder tokens the run has seen, in float64: the latent statistics
    of RAE's latent normalisation (mean and population variance per (channel, row, column), as RAE's
    `calculate_stat.py` measures them over ImageNet), gathered for free since every step encodes its
    images anyway. Each process sums its own samples; `global_state` adds the processes' sums."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, tokens: torch.Tensor) -> None:
        values = tokens.double()
        self.sum += values.sum(dim=0)
        self.sum_sq += values.square().sum(dim=0)
        self.count += len(values)

    def global_state(self) -> dict:
        """The sums over every process, on the CPU (every process must call this under several)."""
        parts = [self.sum.clone(), self.sum_sq.clone(), self.count.clone()]
        for part in parts:
            distributed.all_reduce_sum(part)
        return {"sum": parts[0].cpu(), "sum_sq": parts[1].cpu(), "count": parts[2].cpu()}

    def load(self, state: dict, *, is_main: bool) -> None:
        """Continue from a checkpoint's global sums: the main process holds them, the others start at zero,
        so that `global_state` adds up to the same totals whatever the number of processes."""
        for name in ("sum", "sum_sq", "count"):
            value = state[name].to(getattr(self, name))
            if value.shape != getattr(self, name).shape:
                raise UserError(f"the checkpoint's latent statistics have shape {tuple(value.shape)}, the encoder's "
                                f"tokens {tuple(getattr(self, name).shape)}; resume with the encoder the run used")
            getattr(self, name).copy_(value if is_main else torch.zeros_like(value))

    @staticmethod
    def mean_var(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) in float32 from `global_state`'s sums; var = E[z^2] - E[z]^2, clamped at 0."""
        count = state["count"]
        if count < 1:
            raise ValueError("no tokens were seen yet")
        mean = state["sum"] / count
        var = (state["sum_sq"] / count - mean.square()).clamp_min(0)
        return mean.float(), var.float()


@dataclass
class DecoderTrainingState:
    decoder: torch.nn.Module  # the plain RAEDecoder: RAE's key names
    runnable: torch.nn.Module  # what a step calls: `decoder` checkpointed, compiled, DDP-wrapped as asked
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    token_stats: TokenStatistics
    disc: torch.nn.Module | None = None  # `Discriminator`; its `heads` train
    disc_optimizer: torch.optim.Optimizer | None = None
    lpips: torch.nn.Module | None = None
    position: Position = field(default_factory=Position)
    # Set on the device when a step's loss or gradient was not finite; read when the loop logs or saves.
    nonfinite: torch.Tensor | None = None

    def state_dict(self) -> dict:
        """The checkpoint's content (CPU tensors). Every process must call it (the statistics are summed)."""
        return {
            "decoder": {k: v.detach().cpu() for k, v in self.decoder.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in self.ema.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "disc": None if self.disc is None else {k: v.detach().cpu() for k, v in self.disc.heads.state_dict().items()},
            "disc_optimizer": None if self.disc_optimizer is None else self.disc_optimizer.state_dict(),
            "position": vars(self.position).copy(),
            "token_stats": self.token_stats.global_state(),
        }

    def load_state_dict(self, state: dict, *, is_main: bool) -> None:
        self.decoder.load_state_dict(state["decoder"], strict=True)
        self.ema.load_state_dict(state["ema"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if (self.disc is None) != (state.get("disc") is None):
            raise UserError("the checkpoint was written by a run " + ("without" if self.disc is not None else "with")
                            + " a discriminator; resume with the same --disc-weight")
        if self.disc is not None:
            self.disc.heads.load_state_dict(state["disc"], strict=True)
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.position = Position(**state["position"])
        self.token_stats.load(state["token_stats"], is_main=is_main)


def load_decoder_checkpoint(path: Path) -> dict:
    """A decoder-training checkpoint's content, read without running pickled code; a UserError for a file
    that is not a whole one (the loop then falls back to the previous checkpoint)."""
    check_regular_file(path, "training checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any read failure means the file is not a whole checkpoint
        raise UserError(f"cannot read training checkpoint {str(path)!r} ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != DECODER_TRAIN_FORMAT:
        raise UserError(f"{str(path)!r} is not a fastdit decoder-training checkpoint")
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise UserError(f"training checkpoint {str(path)!r} is incomplete (no {', '.join(missing)})")
    return state
