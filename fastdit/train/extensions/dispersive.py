"""Dispersive loss (Wang & He 2025, "Diffuse and Disperse: Image Generation with Representation
Regularization", arXiv 2506.09027), on top of any objective.

A regulariser on one block's hidden states that pushes the samples of a batch apart, like the negative
half of a contrastive loss, with no positive pairs and no encoder. With z_i the output tokens of block K
of sample i, flattened to d numbers, the InfoNCE-style variant with the squared L2 distance (the paper's
best, its eq. 5 with D = squared L2) is

    L_disp = log (1/B²) Σ_{i,j} exp(−D(z_i, z_j) / τ),        D(z_i, z_j) = ‖z_i − z_j‖² / d,

over all B² ordered pairs of a group of B samples, the pairs i = j included (they contribute exp(0) = 1,
so the mean is at least 1/B and its log finite). The released code divides the squared distance by
the feature count d, so that τ does not have to follow the model's width and token count; its τ is 1,
its weight λ 0.25, its block the last one, and `loss = L_objective + λ L_disp`.

**Groups, not batches.** The loss of a sample depends on the others it is compared with. So that a run
trains the same on 1 or N processes and with any micro-batch split, the batch is cut into groups of
`--disperse-group` consecutive samples of the global batch (each group lies inside one micro-batch of
one process, since the group size must divide the micro-batch), and each sample's term is its group's
L_disp: the batch mean of the term is the mean over groups. The released code takes each GPU's batch
as one group, which makes the loss depend on the number of GPUs.

**Routing.** A block inside token routing's span sees a different random subset of each sample's tokens,
so the flattened z_i of two samples would not compare the same positions: such a block is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...errors import UserError
from ..data_order import batch_split
from ..options import option
from .base import BuildContext, MicroBatch, Term, TrainExtension, register_extension
from .repa import block_output
from .routing import route_settings

RELEASE_WEIGHT = 0.25  # λ of the released code
RELEASE_TEMPERATURE = 1.0  # τ of the released code (with the distance divided by the feature count)


@dataclass
class DispersionSettings:
    disperse: float = option(0.0, f"dispersive loss (Wang & He 2025): its weight λ in the loss (0: off; the flag alone: "
                                  f"{RELEASE_WEIGHT:g}, the released code's)", at_least=0, flag_alone=RELEASE_WEIGHT)
    disperse_depth: int | None = option(None, "the block whose output tokens are dispersed, counted from 1 (default: "
                                              "the last block, as the released code)", at_least=1)
    disperse_temperature: float = option(RELEASE_TEMPERATURE, "the temperature τ of exp(-D / τ), D the squared "
                                                              "distance per feature", positive=True)
    disperse_group: int = option(32, "samples compared with each other: the global batch is cut into groups of this "
                                     "many consecutive samples (it must divide the per-process micro-batch), so the "
                                     "loss does not depend on the process count", at_least=2)


def dispersive_loss(hidden: torch.Tensor, group: int, temperature: float) -> torch.Tensor:
    """Per-sample L_disp of `hidden` (N, ...) in groups of `group` consecutive samples: (N,), each sample
    its group's value (module docstring). Computed in float32 at least, whatever the forward's precision."""
    z = hidden.flatten(1)  # (N, d)
    z = z if z.dtype in (torch.float32, torch.float64) else z.float()
    losses = []
    for members in z.split(group):  # (B, d)
        # The B(B − 1)/2 distances i < j from the differences themselves (`pdist`: no cancellation of
        # ‖z_i‖² + ‖z_j‖² − 2 z_i·z_j, and a backward that holds no (B, B, d) tensor); each pair counts
        # twice in the B² of the mean, and the B pairs i = j contribute exp(0).
        scores = -F.pdist(members).pow(2) / (members.shape[1] * temperature)
        every_pair = torch.cat([scores, scores, scores.new_zeros(len(members))])
        losses.append(torch.logsumexp(every_pair, dim=0) - math.log(len(every_pair)))
    return torch.stack(losses).repeat_interleave(group)


@register_extension
class Dispersion(TrainExtension):
    name: ClassVar[str] = "dispersive"
    section: ClassVar[str] = "dispersion"
    settings: ClassVar[type] = DispersionSettings

    def __init__(self, depth: int, weight: float, temperature: float, group: int):
        self.depth, self.weight, self.temperature, self.group = depth, weight, temperature, group

    @staticmethod
    def _depth(config, num_blocks: int) -> int:
        return config.dispersion.disperse_depth or num_blocks

    @classmethod
    def enabled(cls, config) -> bool:
        return config.dispersion.disperse > 0

    @classmethod
    def validate(cls, config, architecture) -> None:
        settings = config.dispersion
        if not settings.disperse:
            return
        depth = cls._depth(config, architecture.depth)
        if not 1 <= depth <= architecture.depth:
            raise UserError(f"--disperse-depth {depth} is not a block of {config.model.name} "
                            f"(blocks 1..{architecture.depth}); the released code disperses the last block")
        routing = config.routing
        route = route_settings(routing.route, routing.route_blocks, architecture.depth, architecture.grid_size**2)
        if route is not None and route.start <= depth - 1 < route.end:
            raise UserError(f"--disperse-depth {depth} lies in the routed span --route-blocks {routing.route_blocks} "
                            f"(blocks {route.start + 1}..{route.end}, counted from 1), where each sample keeps other "
                            f"tokens; pick a block outside it (default: the last)")

    @classmethod
    def build(cls, context: BuildContext) -> "Dispersion":
        config = context.config
        settings = config.dispersion
        _, micro_batch = batch_split(config.optimisation, context.dist.world_size)
        if micro_batch % settings.disperse_group:
            raise UserError(f"--disperse-group {settings.disperse_group} does not divide the per-process micro-batch "
                            f"{micro_batch}; pass a --disperse-group that divides it (e.g. "
                            f"{math.gcd(micro_batch, settings.disperse_group)})")
        return cls(cls._depth(config, context.model.config.depth), settings.disperse, settings.disperse_temperature,
                   settings.disperse_group)

    def describe(self) -> str:
        return (f"dispersive loss at block {self.depth} (weight {self.weight:g}, τ {self.temperature:g}, "
                f"groups of {self.group})")

    def capture(self, model):
        return block_output(model, self.depth - 1)

    def loss_terms(self, micro: MicroBatch, captured) -> dict[str, Term]:
        return {"disperse": Term(dispersive_loss(captured["tokens"], self.group, self.temperature), self.weight)}
