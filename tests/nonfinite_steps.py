"""Make chosen training steps non-finite, for the tests of `--skip-nonfinite`.

The steps are keyed by the step number the training step draws for (`draw_step`'s `step`, counted
from 0 there, from 1 here as the log counts them), so a resumed process poisons the same steps as an
uninterrupted one. `kind` "loss" multiplies every loss term by inf; "gradient" leaves the loss finite
and makes the backward pass of the network's output inf (a model hook's doing in a real run).
Optionally only on one rank: under DDP every process must still skip together.
"""

from __future__ import annotations

import torch

import fastdit.train.step as step_module
from fastdit.objectives.ddpm import DDPM


class InfiniteGradient(torch.autograd.Function):
    """The identity forward; backward sends inf (times the incoming gradient's sign) upstream."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def install(setattr_fn, bad_steps, kind: str = "loss", rank: int | None = None) -> None:
    """Patch with `setattr_fn` (pytest's `monkeypatch.setattr`, or `setattr` in a throwaway process)."""
    if kind not in ("loss", "gradient"):
        raise ValueError(f"kind must be 'loss' or 'gradient', got {kind!r}")
    bad_steps = {int(s) for s in bad_steps}
    current = {}
    original_draw, original_losses = step_module.draw_step, DDPM.losses

    def draw_step(seed, step, **kwargs):
        current["bad"] = step + 1 in bad_steps and (rank is None or kwargs["rank"] == rank)
        return original_draw(seed, step, **kwargs)

    def losses(self, model, *args, **kwargs):
        if not current.get("bad"):
            return original_losses(self, model, *args, **kwargs)
        if kind == "gradient":
            return original_losses(self, lambda *a, **k: InfiniteGradient.apply(model(*a, **k)), *args, **kwargs)
        return {name: value * float("inf") for name, value in original_losses(self, model, *args, **kwargs).items()}

    setattr_fn(step_module, "draw_step", draw_step)
    setattr_fn(DDPM, "losses", losses)
