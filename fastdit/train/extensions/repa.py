"""Representation alignment (REPA: Yu et al. 2024, "Representation Alignment for Generation: Training
Diffusion Transformers Is Easier Than You Think"), on top of any objective.

The hidden tokens h of the DiT after block K are mapped by a small trainable projector to the width
of a frozen self-supervised encoder, and pulled towards the encoder's patch tokens y of the clean
image by a cosine loss (REPA eq. 8):

    L_repa = − 1/T Σ_t cos(proj(h_t), y_t),        loss = L_objective + λ · L_repa,

per sample, λ = 0.5 and K = 8 for L and XL (4 for B) in the paper; the projector is a 3-layer MLP with
SiLU (hidden width 2048). When the encoder's token grid differs from the DiT's, the encoder's tokens
are resized to the DiT's grid (bilinear on the 2-D grid), as REPA does.

The alignment term is logged as "repa". The projector is trained with the DiT by its own AdamW (so the
DiT's optimizer state keeps the official parameter names), clipped with it by their joint norm, saved
in training checkpoints under "alignment" and left out of the EMA export (which stays the official
layout). Under DDP and FSDP it is replicated on every process and its gradients are averaged by one
all-reduce per step (it is small: 2 × 2048² + hidden·2048 + 2048·D weights). The encoder is frozen:
eval mode, no gradients, its parameters never change.

When block K runs on a subset of each sample's tokens (token routing's span covers it) its output
holds the kept tokens only: they are aligned with the encoder's targets gathered at the same positions.
The other tokens have not been through block K (they hold an earlier block's features), and running
them through it to align them would spend the compute routing saves.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import distributed
from ...errors import UserError
from ...models.routing import gather_tokens
from ...state_dicts import describe_mismatch
from ..options import option
from .base import BuildContext, MicroBatch, Term, TrainExtension, broadcast_from_rank0, register_extension


# The projector holds two projector_dim² matrices and AdamW two moments of each: 2048 (REPA's) is 67 MB;
# 16384 is 4.3 GB, past any width the paper considers; beyond it a typo would allocate terabytes.
MAX_PROJECTOR_DIM = 16384


def paper_depth(num_blocks: int) -> int:
    """The block REPA aligns, counted from 1: 8 for SiT-L and -XL (24 and 28 blocks), 4 for SiT-B (12)."""
    return 4 if num_blocks <= 12 else 8


@dataclass
class AlignmentSettings:
    # The paper's defaults: λ 0.5, projector width 2048, block 8 of XL.
    repa: str | None = option(None, "align block --repa-depth's tokens with this frozen encoder (REPA): dinov2-vitb14 "
                                    "(REPA's), another DINOv2/DINOv3 size, hf:OWNER/REPO, NAME=FOLDER (a local copy) "
                                    "or a TorchScript file (default: off)")
    repa_depth: int = option(paper_depth(28), f"the block whose output tokens are aligned, counted from 1 (REPA: "
                                              f"{paper_depth(28)} for L and XL, {paper_depth(12)} for B)", at_least=1)
    repa_weight: float = option(0.5, "weight λ of the alignment term in the loss", at_least=0)
    repa_projector_dim: int = option(2048, "hidden width of the 3-layer projector", at_least=1,
                                     at_most=MAX_PROJECTOR_DIM)


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


@contextlib.contextmanager
def block_output(model: nn.Module, index: int):
    """Keep the output of `model.blocks[index]` during the forwards inside: `captured["tokens"]` is
    (N, T, hidden), or (N, K, hidden) on a routed block; the last forward through the block wins."""
    captured: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        captured["tokens"] = output

    handle = model.blocks[index].register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


@register_extension
class RepresentationAlignment(TrainExtension):
    name: ClassVar[str] = "repa"
    section: ClassVar[str] = "alignment"
    settings: ClassVar[type] = AlignmentSettings
    needs_images: ClassVar[bool] = True  # the encoder sees the clean image of each sample
    checkpoint_key: ClassVar[str] = "alignment"

    def __init__(self, encoder: nn.Module, projector: Projector, depth: int, weight: float,
                 optimizer: torch.optim.Optimizer, *, grid_size: int, encoder_name: str = ""):
        self.encoder, self.projector, self.depth, self.weight = encoder, projector, depth, weight
        self.optimizer = optimizer  # the projector's own AdamW
        self.grid_size = grid_size  # the DiT's token grid side, to which the encoder's tokens are resized
        self.encoder_name = encoder_name

    @classmethod
    def enabled(cls, config) -> bool:
        return bool(config.alignment.repa)

    @classmethod
    def validate(cls, config, architecture) -> None:
        settings = config.alignment
        if settings.repa and not 1 <= settings.repa_depth <= architecture.depth:
            raise UserError(f"--repa-depth {settings.repa_depth} is not a block of {config.model.name} "
                            f"(blocks 1..{architecture.depth}); REPA aligns block {paper_depth(28)} of XL, "
                            f"{paper_depth(12)} of B")

    @classmethod
    def build(cls, context: BuildContext) -> "RepresentationAlignment":
        """The frozen encoder (`fastdit.encoders`) and a fresh projector from the DiT's width to the
        encoder's. Built right after the DiT from the same seeded stream, so every process starts from
        the same projector."""
        from ...encoders import load_encoder

        settings, model, device = context.config.alignment, context.model, context.dist.device
        encoder = load_encoder(settings.repa, device=device)
        projector = Projector(model.config.hidden_size, settings.repa_projector_dim, encoder.dim).to(device)
        return cls(encoder, projector, settings.repa_depth, settings.repa_weight, context.make_optimizer(projector),
                   grid_size=model.config.grid_size, encoder_name=settings.repa)

    def describe(self) -> str:
        return f"REPA with {self.encoder_name} at block {self.depth} (weight {self.weight:g})"

    def capture(self, model):
        return block_output(model, self.depth - 1)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens of clean images in [-1, 1], on the DiT's token grid; no gradient."""
        from ...encoders import tokens_to_grid

        with torch.no_grad():
            return tokens_to_grid(self.encoder(images).float(), self.grid_size)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return alignment_loss(self.projector(hidden), targets)

    def loss_terms(self, micro: MicroBatch, captured) -> dict[str, Term]:
        tokens = captured["tokens"]  # (N, K, hidden) when the aligned block is routed, else (N, T, hidden)
        targets = self.targets(micro.images)
        kept = micro.tokens_seen_by(self.depth - 1)
        if kept is not None:
            targets = gather_tokens(targets, kept)
        return {"repa": Term(self.loss(tokens, targets), self.weight)}

    def parameters(self):
        return list(self.projector.parameters())

    def after_backward(self) -> None:
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

    def state_dict(self, options):
        # replicated on every process: any process's copy is the whole of it. "encoder" says which encoder
        # the projector was trained against (its name, the hash of its files, what it returns).
        return {"projector": self.projector.state_dict(), "optimizer": self.optimizer.state_dict(),
                "encoder": dict(self.encoder.identity)}

    def load_state_dict(self, state, options):
        state = broadcast_from_rank0(state, options)  # small: the projector and its AdamW moments
        if not (isinstance(state, dict) and isinstance(state.get("projector"), dict)
                and isinstance(state.get("optimizer"), dict) and isinstance(state.get("encoder", {}), dict)
                and all(isinstance(v, torch.Tensor) for v in state["projector"].values())):
            raise UserError("the checkpoint's REPA section (alignment) is malformed (no projector weights and "
                            "optimizer state); restore the checkpoint, or pass another --run-name")
        self.refuse_other_encoder(state.get("encoder"))
        problem = describe_mismatch(self.projector.state_dict(), state["projector"])
        if problem:  # a checkpoint from before the encoder was recorded, of another width
            raise UserError(f"the checkpoint's REPA projector does not fit encoder {self.encoder_name} ({problem}); "
                            "resume with the encoder the run was trained with, or pass another --run-name")
        self.projector.load_state_dict(state["projector"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise UserError(f"the checkpoint's REPA optimizer state does not fit the projector ({type(err).__name__}: "
                            f"{str(err)[:120]}); restore the checkpoint, or pass another --run-name") from None

    def refuse_other_encoder(self, recorded: dict | None) -> None:
        """A resumed run aligns with the encoder it was trained against: targets of other weights, even of
        the same shape, would change what the projector learnt with no sign of it. Refused as the run's
        other settings are, with the differences listed. Checkpoints written before the encoder was
        recorded hold none: their projector's shapes are checked instead."""
        from ...run_folder import refuse_other_settings

        if recorded is None:
            return
        current = self.encoder.identity
        recorded = {key: recorded.get(key) for key in current}
        refuse_other_settings(
            "this run's checkpoint records its REPA encoder", _short_hash(recorded), _short_hash(current),
            "pass the encoder it was trained with (the same files) to resume it, or pass another --run-name",
        )


def _short_hash(identity: dict) -> dict:
    """The identity as a message lists it: the content hash cut to 12 hex digits."""
    return {**identity, "sha256": (identity.get("sha256") or "")[:12] or None}
