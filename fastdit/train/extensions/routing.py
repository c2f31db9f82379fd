"""Token routing (TREAD, Krause et al. 2025, arXiv 2501.04765) as a training extension, on top of any
objective; the mechanism is `fastdit.models.routing`. Here: the span `--route-blocks START:END`, how
many tokens a sample keeps at `--route RATE`, each sample's draw of which ones, and the route handed to
the trained forward only (the objective's target passes run on every token).

Defaults are TREAD's: half of the tokens routed (selection ratio 0.5 in the paper's release) from
block 2 to the second-to-last block inclusive (its release's `start_layer_idx 2`, `end_layer_idx -2`,
both inclusive and 0-based), written here as the Python slice `2:-1`, i.e. `blocks[2:-1]`: blocks
2 .. 26 of DiT-XL/2's 28, 2 .. 10 of the 12 of DiT-S/B.

The draw: sample g of step s takes its kept tokens from its own generator (`fastdit.train.step_noise`,
seeded by (seed, s, g)) after every other draw of that sample (the extension's `draw` hook), so a run without routing draws exactly
what it drew before routing existed, and a routed run's subsets do not depend on the process count,
the micro-batches or a resume.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import UserError
from ...models.routing import TokenRoute
from ..options import option
from .base import BuildContext, MicroBatch, TrainExtension, register_extension

PAPER_RATE = 0.5
PAPER_SPAN = "2:-1"  # blocks[2:-1]: from block 2 to the second-to-last inclusive, as TREAD routes
_SPAN = re.compile(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*")


@dataclass(frozen=True)
class RouteSettings:
    """A run's routing: blocks[start:end] see `num_kept` of the `num_tokens` tokens of each sample."""

    start: int
    end: int
    num_tokens: int
    num_kept: int


def parse_span(text: str) -> tuple[int, int]:
    """'START:END' -> (START, END), unresolved (END may count from the end, as in a Python slice)."""
    match = _SPAN.fullmatch(str(text))
    if not match:
        raise UserError(f"--route-blocks {text!r} is not START:END (block indices from 0, END excluded, as in "
                        f"a Python slice, e.g. {PAPER_SPAN} for TREAD's span)")
    return int(match[1]), int(match[2])


def resolve_span(text: str, depth: int) -> tuple[int, int]:
    """The span `text` of a model with `depth` blocks as 0 <= start < end <= depth; a UserError when it
    is empty or outside the blocks."""
    start, end = parse_span(text)
    resolved_start, resolved_end = (start + depth if start < 0 else start), (end + depth if end < 0 else end)
    if not 0 <= resolved_start < resolved_end <= depth:
        raise UserError(f"--route-blocks {text} is not a span of this model's {depth} blocks (it resolves to "
                        f"blocks[{resolved_start}:{resolved_end}]); give START:END with 0 <= START < END <= {depth}")
    return resolved_start, resolved_end


def kept_tokens(num_tokens: int, rate: float) -> int:
    """Tokens a sample keeps in the span at routing rate `rate` in [0, 1): T − floor(rate T), at least 1."""
    return num_tokens - math.floor(rate * num_tokens)


def route_settings(rate: float, span: str, depth: int, num_tokens: int) -> RouteSettings | None:
    """The run's routing, or None when `rate` is 0 (or routes no whole token: the step is today's)."""
    if rate == 0:
        return None
    start, end = resolve_span(span, depth)
    kept = kept_tokens(num_tokens, rate)
    return None if kept == num_tokens else RouteSettings(start, end, num_tokens, kept)


def draw_kept(settings: RouteSettings, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One sample's kept token indices, (1, K) in increasing order: a uniformly random K-subset."""
    order = torch.randperm(settings.num_tokens, generator=generator, device=device)
    return order[: settings.num_kept].sort().values.unsqueeze(0)


@dataclass
class RoutingSettings:
    route: float = option(0.0, f"token routing (TREAD): the share of each sample's tokens that skip the blocks of "
                               f"--route-blocks during training (0: off; the flag alone: {PAPER_RATE}, the paper's); "
                               f"sampling and the EMA export are unchanged", unit_interval=True, flag_alone=PAPER_RATE)
    route_blocks: str = option(PAPER_SPAN, "the routed span START:END as a Python slice of the blocks (0-based, END "
                                           f"excluded, negative counts from the end); {PAPER_SPAN}: from block 2 to "
                                           "the second-to-last, as TREAD routes")


@register_extension
class TokenRouting(TrainExtension):
    name: ClassVar[str] = "routing"
    section: ClassVar[str] = "routing"
    settings: ClassVar[type] = RoutingSettings

    def __init__(self, route: RouteSettings):
        self.route = route

    @staticmethod
    def _settings_for(config, architecture) -> RouteSettings | None:
        settings = config.routing
        return route_settings(settings.route, settings.route_blocks, architecture.depth, architecture.grid_size**2)

    @classmethod
    def enabled(cls, config) -> bool:
        return config.routing.route > 0

    @classmethod
    def validate(cls, config, architecture) -> None:
        parse_span(config.routing.route_blocks)  # a malformed span is an error even while routing is off
        if config.routing.route:
            resolve_span(config.routing.route_blocks, architecture.depth)

    @classmethod
    def build(cls, context: BuildContext) -> "TokenRouting | None":
        route = cls._settings_for(context.config, context.model.config)
        if route is None:  # a setting that would silently do nothing; the token count is known only now
            rate, tokens = context.config.routing.route, context.model.config.grid_size**2
            raise UserError(f"--route {rate:g} routes no token of this model's {tokens} tokens per sample "
                            f"(floor({rate:g} x {tokens}) = 0), so it would change nothing; pass --route "
                            f"{math.ceil(1e3 / tokens) / 1e3:g} or more (the paper's: {PAPER_RATE}), or leave it out")
        return cls(route)

    def describe(self) -> str:
        route = self.route
        return (f"token routing: blocks[{route.start}:{route.end}] see {route.num_kept} of {route.num_tokens} tokens "
                f"per sample")

    def draw(self, generator, device):
        return {"route_kept": draw_kept(self.route, generator, device)}

    def training_inputs(self, micro: MicroBatch) -> dict:
        return {"route": TokenRoute(micro.draws.extra["route_kept"], self.route.start, self.route.end)}
