"""Representation alignment (REPA: Yu et al. 2024, "Representation Alignment for Generation: Training
Diffusion Transformers Is Easier Than You Think").

The hidden tokens h of the DiT after block K are mapped by a small trainable projector to the width
of a frozen self-supervised encoder, and pulled towards the encoder's patch tokens y of the clean
image by a cosine loss (REPA eq. 8):

    L_repa = − 1/T Σ_t cos(proj(h_t), y_t),        loss = L_objective + λ · L_repa,

per sample, λ = 0.5 and K = 8 for XL (4 for B) in the paper; the projector is a 3-layer MLP with SiLU
(hidden width 2048). When the encoder's token grid differs from the DiT's, the encoder's tokens are
resized to the DiT's grid (bilinear on the 2-D grid), as REPA does.

It works with every objective: the alignment term is added to the objective's terms and logged as
"repa". The projector is trained with the DiT, saved in training checkpoints and left out of the EMA
export (which stays the official layout); under DDP and FSDP it is replicated on every process and
its gradients are averaged by one all-reduce per step (it is small: 2 × 2048² + hidden·2048 +
2048·D weights). The encoder is frozen: eval mode, no gradients, its parameters never change.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..encoders import tokens_to_grid


class Projector(nn.Sequential):
    """REPA's projector: Linear -> SiLU -> Linear -> SiLU -> Linear, hidden width -> encoder width."""

    def __init__(self, hidden_size: int, projector_dim: int, encoder_dim: int):
        super().__init__(
            nn.Linear(hidden_size, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, encoder_dim),
        )


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample − mean over tokens of cos(projected, target); both (N, T, D)."""
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean(dim=1)


class Alignment:
    """The REPA term of a run: the frozen `encoder`, the trainable `projector` and block `depth`."""

    def __init__(self, encoder: nn.Module, projector: Projector, depth: int, weight: float,
                 optimizer: torch.optim.Optimizer | None = None):
        self.encoder, self.projector, self.depth, self.weight = encoder, projector, depth, weight
        self.optimizer = optimizer  # the projector's own AdamW (the DiT's optimizer state keeps official names)

    def state_dict(self) -> dict:
        return {"projector": self.projector.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.projector.load_state_dict(state["projector"])
        self.optimizer.load_state_dict(state["optimizer"])

    @contextlib.contextmanager
    def hidden_tokens(self, model: nn.Module):
        """Record the output of block `depth` (1-based, as REPA counts) of `model` during the forward
        inside the block: `captured["tokens"]` is (N, T, hidden)."""
        captured: dict[str, torch.Tensor] = {}

        def keep(module, inputs, output):
            captured["tokens"] = output

        handle = model.blocks[self.depth - 1].register_forward_hook(keep)
        try:
            yield captured
        finally:
            handle.remove()

    def targets(self, images: torch.Tensor, side: int) -> torch.Tensor:
        """The encoder's tokens of clean images in [-1, 1], on the DiT's token grid; no gradient."""
        with torch.no_grad():
            return tokens_to_grid(self.encoder(images).float(), side)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return alignment_loss(self.projector(hidden), targets)

    def average_gradients(self) -> None:
        """The projector is replicated: average its gradients over the processes (one all-reduce)."""
        if not distributed.is_initialized():
            return
        grads = [p.grad for p in self.projector.parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            distributed.all_reduce_mean(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
