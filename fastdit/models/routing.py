"""Token routing through a span of blocks (TREAD: Krause et al. 2025, "TREAD: Token Routing for
Efficient Architecture-agnostic Diffusion Training", arXiv 2501.04765).

During training a random share of each sample's tokens leaves the sequence before block `start` and
rejoins it, unchanged, before block `end`: blocks `start .. end - 1` see only the kept tokens, so their
attention and MLPs cost (kept / T) of the full sequence's (attention's T×T products: (kept / T)²). The
routed tokens carry their values from before the span into the later blocks, the paper's "route" from
an early layer to a deeper one; nothing is added to the model and nothing is dropped from the loss.

Positions stay right: the absolute sin-cos table is added to every token before any block, so a kept
token carries its own position into the span; under RoPE each kept token is rotated by its own row of
the (T, d/2) tables, gathered with the same indices.

A `TokenRoute` is what `DiT.forward(..., route=)` takes: which tokens each sample keeps and the span.
Training draws it (`fastdit.train.extensions.routing`); sampling never passes one, so a trained model
runs on every token in every block, as the official code's forward does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gather_tokens(tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The tokens `kept` (N, K) of each sample: (N, T, ...) -> (N, K, ...)."""
    index = kept.reshape(*kept.shape, *([1] * (tokens.ndim - 2))).expand(-1, -1, *tokens.shape[2:])
    return torch.gather(tokens, 1, index)


@dataclass(frozen=True)
class TokenRoute:
    """`kept` (N, K) long: each sample's token indices that go through blocks `start .. end - 1`
    (0-based, `end` exclusive: `model.blocks[start:end]`); the other T − K tokens skip them."""

    kept: torch.Tensor
    start: int
    end: int

    def check(self, batch: int, num_tokens: int, depth: int) -> None:
        """A ValueError for a route that does not fit the model or the batch (a caller's bug)."""
        if not 0 <= self.start < self.end <= depth:
            raise ValueError(f"route span {self.start}:{self.end} is not a non-empty span of the {depth} blocks")
        if self.kept.ndim != 2 or self.kept.shape[0] != batch or not 0 < self.kept.shape[1] <= num_tokens:
            raise ValueError(f"route keeps {tuple(self.kept.shape)} tokens; expected (N={batch}, K <= {num_tokens})")

    def covers(self, block: int) -> bool:
        """Whether block `block` (0-based) sees only the kept tokens."""
        return self.start <= block < self.end

    def kept_at(self, block: int) -> torch.Tensor | None:
        """The token indices (N, K) block `block` (0-based) runs on, None when it sees every token."""
        return self.kept if self.covers(block) else None

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """The kept tokens of each sample: (N, T, ...) -> (N, K, ...)."""
        return gather_tokens(tokens, self.kept)

    def rejoin(self, full: torch.Tensor, kept_tokens: torch.Tensor) -> torch.Tensor:
        """`full` (N, T, D) from before the span with the kept tokens' new values put back: the routed
        tokens keep the values they had when they left. Out of place, so autograd sees both paths."""
        index = self.kept.unsqueeze(-1).expand(-1, -1, full.shape[-1])
        return full.scatter(1, index, kept_tokens)

    def rope_rows(self, table: torch.Tensor) -> torch.Tensor:
        """Each kept token's row of a RoPE table: (T, d/2) -> (N, 1, K, d/2), broadcast over heads."""
        return table[self.kept].unsqueeze(1)

    def select(self, rows: torch.Tensor) -> "TokenRoute":
        """The route of a subset of the batch's samples (`rows`: indices or a bool mask)."""
        return TokenRoute(self.kept[rows], self.start, self.end)
