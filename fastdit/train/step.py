"""One optimizer step: `train_step(state, batch, objective)`.

The step knows nothing of the method it trains: the objective draws each sample's randomness
(`Objective.draw`, seeded per global sample by `step_noise`) and returns its loss as named per-sample
terms (`Objective.losses`); the step optimises "loss" and reports every term's batch mean, averaged
over the processes, and the gradient's norm, for the log.

A step whose loss or gradient is not finite on any process makes no update (`StepResult.skipped`):
no optimizer step, no EMA update; its draws and its batch are used up all the same, since they are
functions of the step number, so the run goes on (or resumes) exactly as if the step had been taken
with a zero learning rate and no optimizer state change. The loop decides whether to go on
(`--skip-nonfinite`) or stop (`NonFiniteLoss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import contextlib
import math

import torch

from .. import distributed
from ..errors import UserError
from ..models.routing import TokenRoute
from ..objectives import Objective
from ..precision import autocast
from .ema import update_ema
from .routing import RouteSettings
from .setup import no_sync
from .state import TrainingState
from .step_noise import draw_step


class NonFiniteLoss(UserError):
    pass


@dataclass(frozen=True)
class StepResult:
    terms: dict[str, torch.Tensor]  # each loss term's mean over the global batch (float64 scalars), "loss" first
    grad_norm: torch.Tensor  # the global L2 norm of the gradient before clipping (float64 scalar)
    skipped: bool  # the loss or the gradient was not finite (on some process): nothing was updated

    def problem(self) -> str:
        """What was not finite, in words: "the loss became nan" or "the gradient norm became inf"."""
        loss = self.terms["loss"]
        if not torch.isfinite(loss):
            return f"the loss became {loss.item()}"
        return f"the gradient norm became {self.grad_norm.item()}"


def non_finite_message(result: StepResult, step: int) -> str:
    """The message a run stops with; `step` counted from 1."""
    return (f"{result.problem()} at step {step}; stopping. The last good checkpoint is intact. "
            f"Try a lower --lr, --grad-clip 1.0, --warmup-steps, or --precision bf16 instead of fp16; "
            f"--skip-nonfinite K skips up to K such steps in a row")


@dataclass(frozen=True)
class StepSettings:
    """What a step needs beyond the state, the batch and the objective: fixed for the whole run."""

    seed: int
    global_batch: int
    local_batch: int  # this process's share of the global batch
    micro_batch: int  # per forward; gradient accumulation when smaller than local_batch
    rank: int
    device: torch.device
    input_shape: tuple[int, ...]  # (C, H, W) of the model input
    class_dropout_prob: float
    precision: str
    lr: float
    warmup_steps: int
    grad_clip: float | None
    ema_decay: float
    # images -> (mean, std) of the VAE posterior, when the data are images encoded during training
    encode: Callable | None = None
    route: RouteSettings | None = None  # token routing (TREAD) through a span of blocks; None: off


def train_step(state: TrainingState, batch, objective: Objective) -> StepResult:
    """One optimizer step at `state.position.step` (the caller advances the position) on `batch`
    = (inputs, labels) of this process, or (inputs, labels, images) where a latent store hands the
    images its latents were encoded from. Returns each loss term's mean over the global batch (float64
    scalars, "loss" first) and the gradient norm, the same on every process, and whether the step was
    skipped for a non-finite loss or gradient (then nothing was updated).

    With representation alignment (`state.alignment`, REPA) the "repa" term of block K's tokens joins
    the objective's terms, and "loss" includes it with its weight.

    With token routing (`settings.route`, TREAD) each sample's kept tokens, drawn with its other draws,
    reach the model as `route=` among the model kwargs, which every objective passes to its trained
    forward. When REPA's block lies inside the routed span it sees the kept tokens only, and is aligned
    on those (the encoder's targets gathered at the same positions): the routed tokens have not been
    through that block (they hold an earlier block's features), and running them through it to align
    them would spend the compute routing saves. Outside the span the block sees every token."""
    settings, step, alignment = state.settings, state.position.step, state.alignment
    optimizer, scaler, device = state.optimizer, state.scaler, settings.device
    x, y = (part.to(device, non_blocking=True) for part in batch[:2])
    # The images the encoder sees: those a store kept, else the inputs themselves (pixels, or images
    # that are encoded below).
    images = None if alignment is None else (batch[2].to(device, non_blocking=True) if len(batch) > 2 else x)
    draws = draw_step(
        settings.seed, step,
        global_batch=settings.global_batch, rank=settings.rank, local_batch=settings.local_batch,
        shape=settings.input_shape, objective=objective, dropout_prob=settings.class_dropout_prob,
        with_latent_noise=settings.encode is not None, device=device, route=settings.route,
    )
    if settings.encode is not None:
        with torch.no_grad():
            mean, std = settings.encode(x)
            x = mean + std * draws.latent_noise
    optimizers = [optimizer] if alignment is None else [optimizer, alignment.optimizer]
    for opt in optimizers:
        _set_lr(opt, settings, step)
        opt.zero_grad(set_to_none=True)
    num_micro = settings.local_batch // settings.micro_batch
    names, totals = None, None
    for k in range(num_micro):
        part = slice(k * settings.micro_batch, (k + 1) * settings.micro_batch)
        micro = draws.micro(part.start, part.stop)
        model_kwargs = {"y": y[part], "force_drop_ids": micro.drop_labels}
        route = None
        if settings.route is not None:
            route = TokenRoute(micro.route_kept, settings.route.start, settings.route.end)
            model_kwargs["route"] = route
        with no_sync(state.runnable, k < num_micro - 1), autocast(device, settings.precision):
            capture = alignment.hidden_tokens(state.model) if alignment else contextlib.nullcontext()
            with capture as hidden:
                terms = objective.losses(state.runnable, x[part], micro.objective, model_kwargs)
            if alignment is not None:
                tokens = hidden["tokens"]  # (N, K, hidden) when the aligned block is routed, else (N, T, hidden)
                aligned_routed = route is not None and route.covers(alignment.depth - 1)
                side = math.isqrt(settings.route.num_tokens if aligned_routed else tokens.shape[1])
                targets = alignment.targets(images[part], side)
                if aligned_routed:
                    targets = route.gather(targets)
                terms["repa"] = alignment.loss(tokens, targets)
                terms["loss"] = terms["loss"] + alignment.weight * terms["repa"]
            means = {name: value.float().mean() / num_micro for name, value in terms.items()}
        scaler.scale(means["loss"]).backward()
        if names is None:
            names = ["loss", *sorted(name for name in means if name != "loss")]
            totals = torch.zeros(len(names), dtype=torch.float64, device=device)
        totals += torch.stack([means[name].detach() for name in names]).double()
    if alignment is not None:
        alignment.average_gradients()  # replicated, outside DDP/FSDP: averaged here
    for opt in optimizers:
        scaler.unscale_(opt)  # the norm (and clipping) of the true gradient; a disabled scaler does nothing
    groups = [list(state.model.parameters())] + ([list(alignment.projector.parameters())] if alignment is not None else [])
    if settings.grad_clip is None:
        grad_norm = _gradient_norm(groups)
    elif alignment is None:
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(state.model.parameters(), settings.grad_clip))
    else:  # REPA clips the DiT and its projector together, by their joint norm
        grad_norm = _clip_jointly(groups, settings.grad_clip)
    # Under fp16 an infinite gradient with a finite loss is the gradient scaler's overflow: it skips the
    # optimizer step and lowers its scale itself. Otherwise a non-finite gradient is this step's fault.
    bad_gradient = (~torch.isfinite(grad_norm)).to(totals) * float(not scaler.is_enabled())
    # One all-reduce a step for the log and the decision: the terms, the norm, and whether any process
    # saw a non-finite gradient (its mean is > 0 then), so that every process skips, or stops, together.
    summary = torch.cat([totals, grad_norm.reshape(1).to(totals), bad_gradient.reshape(1)])
    distributed.all_reduce_mean(summary)
    totals, grad_norm, bad_gradient = summary[:-2], summary[-2], bool(summary[-1] > 0)
    terms = dict(zip(names, totals))
    if bad_gradient or not torch.isfinite(totals[0]):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update()  # unscale_ was called: the scaler must close the step (it lowers its scale)
        return StepResult(terms, grad_norm, skipped=True)
    for opt in optimizers:
        scaler.step(opt)  # a disabled scaler (fp32, bf16) just steps
    scaler.update()
    update_ema(state.ema, state.model, settings.ema_decay)
    if state.posthoc is not None:
        state.posthoc.update(state.model, step + 1)  # counted from 1: the first update copies the weights
    return StepResult(terms, grad_norm, skipped=False)


def _full(norm: torch.Tensor) -> torch.Tensor:
    """A norm over FSDP2's sharded (DTensor) gradients made whole; a plain tensor as it is."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _gradient_norm(groups) -> torch.Tensor:
    """‖g‖ = sqrt(Σ ‖g_i‖²) over several groups of parameters. One `get_total_norm` call cannot take
    them together when one group is sharded (FSDP2's DTensor gradients) and another replicated (plain
    tensors), so each group's norm is taken apart and made whole."""
    grads = [[p.grad for p in group if p.grad is not None] for group in groups]
    norms = [_full(torch.nn.utils.get_total_norm(part)).float() for part in grads if part]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _clip_jointly(groups, max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over several groups at once, by their joint norm (`_gradient_norm`), which it returns."""
    groups = [list(group) for group in groups]
    total = _gradient_norm(groups)
    # As clip_grad_norm_ computes it, on the device: no host sync a step (a factor of 1 changes nothing).
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for group in groups:
        grads = [p.grad for p in group if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total


def _set_lr(optimizer, settings: StepSettings, step: int) -> None:
    # Linear warm-up to the base rate, then constant (DiT trains at a constant 1e-4).
    scale = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = settings.lr * scale
