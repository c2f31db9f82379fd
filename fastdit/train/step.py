"""One optimizer step: `train_step(state, batch, objective)`.

The step knows nothing of the method it trains: the objective draws each sample's randomness
(`Objective.draw`, seeded per global sample by `step_noise`) and returns its loss as named per-sample
terms (`Objective.losses`); the training extensions (`fastdit.train.extensions`) add their draws, their
inputs to the trained forward, their loss terms, their parameters and what they update after the step,
through the hooks of `TrainExtension`. The step optimises "loss" and reports every term's batch mean,
averaged over the processes, and the gradient's norm, for the log.

A step whose loss or gradient is not finite on any process makes no update (`StepResult.skipped`):
no optimizer step, no extension's after-step update (the EMA's); its draws and its batch are used up
all the same, since they are functions of the step number, so the run goes on (or resumes) exactly as
if the step had been taken with a zero learning rate and no optimizer state change. The loop decides
whether to go on (`--skip-nonfinite`) or stop (`NonFiniteLoss`).

**No host sync.** The decision is made on the device: the fused AdamW takes the all-reduced "not
finite" flag as its `found_inf` (as under a gradient scaler: the kernel leaves weights, moments and step
count as they were), and the extensions' after-step updates are scaled by `taken` (0 on a skipped step).
`StepResult` holds device tensors; the loop reads them a step later, while the next step runs, or
when it logs or saves. Under fp16 the gradient scaler decides on the host, as it does itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..compile import eager
from ..errors import UserError
from ..objectives import Objective, TrainingNetwork
from ..precision import autocast
from .extensions import MicroBatch
from .setup import no_sync
from .state import TrainingState
from .step_noise import draw_step


class NonFiniteLoss(UserError):
    pass


@dataclass(frozen=True)
class StepResult:
    """Device tensors, the same on every process: reading them waits for the step (`fastdit.train.loop`
    reads them one step late)."""

    terms: dict[str, torch.Tensor]  # each loss term's mean over the global batch (float64 scalars), "loss" first
    grad_norm: torch.Tensor  # the global L2 norm of the gradient before clipping (float64 scalar)
    skipped: torch.Tensor  # bool scalar: the loss or the gradient was not finite (on some process): no update
    # The objective's own loss ("loss" before the extensions' terms are added), when extensions add any.
    objective_loss: torch.Tensor | None = None
    methods: dict[str, str] = field(default_factory=dict)  # an extension's term -> the extension's name

    def problem(self) -> str:
        """What was not finite, in words: "the loss became nan", "the loss became nan through its X term
        (from the X training method; ...)" or "the gradient norm became inf"."""
        loss = self.terms["loss"]
        if torch.isfinite(loss):
            return f"the gradient norm became {self.grad_norm.item()}"
        text = f"the loss became {loss.item()}"
        bad = [name for name in self.methods if not torch.isfinite(self.terms[name])]
        if bad and self.objective_loss is not None and torch.isfinite(self.objective_loss):
            text += (f" through its {bad[0]} term (from the {self.methods[bad[0]]} training method; the objective's "
                     f"own loss is finite)")
        return text

    @property
    def method_is_the_cause(self) -> bool:
        """Whether only an extension's term is not finite (not the objective's loss or the gradient)."""
        return "through its" in self.problem()


def non_finite_message(result: StepResult, step: int, *, saved: bool = True) -> str:
    """The message a run stops with; `step` counted from 1, `saved`: a checkpoint of the run exists."""
    kept = ("The last good checkpoint is intact" if saved else
            "No checkpoint was written yet (a rerun starts again from step 1)")
    if result.method_is_the_cause:
        advice = ("check that method's inputs and settings (for a method with a frozen encoder: the encoder's "
                  "output on your images); the learning rate is not the cause")
    else:
        advice = "try a lower --lr, --grad-clip 1.0, --warmup-steps, or --precision bf16 instead of fp16"
    return (f"{result.problem()} at step {step}; stopping. {kept}. {advice[0].upper() + advice[1:]}; "
            f"--skip-nonfinite K skips up to K such steps in a row")


def train_step(state: TrainingState, batch, objective: Objective) -> StepResult:
    """One optimizer step at `state.position.step` (the caller advances the position) on `batch`
    = (inputs, labels) of this process, or (inputs, labels, images) where a latent store hands the
    images its latents were encoded from. Returns each loss term's mean over the global batch (float64
    scalars, "loss" first) and the gradient norm, the same on every process, and whether the step was
    skipped for a non-finite loss or gradient (then nothing was updated)."""
    config, layout, step, extensions = state.config, state.layout, state.position.step, state.extensions
    optim, scaler, device = config.optimisation, state.scaler, layout.device
    x, y = (part.to(device, non_blocking=True) for part in batch[:2])
    # The images an extension's encoder sees: those a store kept, else the inputs themselves (pixels, or
    # images that are encoded below).
    images = None if not state.needs_images else (batch[2].to(device, non_blocking=True) if len(batch) > 2 else x)
    draws = draw_step(
        optim.global_seed, step,
        global_batch=optim.global_batch_size, rank=layout.rank, local_batch=layout.local_batch,
        shape=layout.input_shape, objective=objective, dropout_prob=config.model.class_dropout_prob,
        with_latent_noise=layout.encode is not None, device=device, extra_draws=[e.draw for e in extensions],
    )
    if layout.encode is not None:
        with torch.no_grad():
            mean, std = layout.encode(x)
            x = mean + std * draws.latent_noise
    optimizers = [state.optimizer, *(e.optimizer for e in extensions if e.optimizer is not None)]
    for opt in optimizers:
        _set_lr(opt, optim, step)
        opt.zero_grad(set_to_none=True)
    num_micro = layout.local_batch // layout.micro_batch
    names, totals = None, None
    for k in range(num_micro):
        part = slice(k * layout.micro_batch, (k + 1) * layout.micro_batch)
        micro = MicroBatch(x[part], None if images is None else images[part], y[part], draws.micro(part.start, part.stop))
        with no_sync(state.runnable, k < num_micro - 1), autocast(device, config.run.precision):
            terms, methods = _losses(state, objective, micro)
            means = {name: value.float().mean() / num_micro for name, value in terms.items()}
        scaler.scale(means["loss"]).backward()
        if names is None:
            names = ["loss", *sorted(name for name in means if name != "loss")]
            totals = torch.zeros(len(names), dtype=torch.float64, device=device)
        totals += torch.stack([means[name].detach() for name in names]).double()
    for extension in extensions:
        extension.after_backward()  # e.g. a replicated module outside DDP/FSDP averages its gradients
    for opt in optimizers:
        scaler.unscale_(opt)  # the norm (and clipping) of the true gradient; a disabled scaler does nothing
    grad_norm = _clipped_gradient_norm(state)
    # Under fp16 an infinite gradient with a finite loss is the gradient scaler's overflow: it skips the
    # optimizer step and lowers its scale itself. Otherwise a non-finite gradient is this step's fault.
    bad_gradient = (~torch.isfinite(grad_norm)).to(totals) * float(not scaler.is_enabled())
    # One all-reduce a step for the log and the decision: the terms, the norm, and whether any process
    # saw a non-finite gradient (its mean is > 0 then), so that every process skips, or stops, together.
    summary = torch.cat([totals, grad_norm.reshape(1).to(totals), bad_gradient.reshape(1)])
    distributed.all_reduce_mean(summary)
    totals, grad_norm = summary[:-2], summary[-2]
    skipped = (summary[-1] > 0) | ~torch.isfinite(totals[0])  # on the device
    terms = dict(zip(names, totals))
    objective_loss = terms.pop(OBJECTIVE_LOSS, None)
    if scaler.is_enabled() or not all(opt.defaults.get("fused") for opt in optimizers):
        return _update_deciding_on_the_host(state, optimizers,
                                            StepResult(terms, grad_norm, skipped, objective_loss, methods))
    found_inf = skipped.to(torch.float32)
    for opt in optimizers:
        opt.found_inf = found_inf  # read by the fused kernel, as a gradient scaler hands it over
        try:
            opt.step()
        finally:
            del opt.found_inf
    taken = (~skipped).to(torch.float32)
    for extension in extensions:
        extension.after_step(state.model, step, taken)
    return StepResult(terms, grad_norm, skipped, objective_loss, methods)


def _update_deciding_on_the_host(state: TrainingState, optimizers, result: StepResult) -> StepResult:
    """The step's update where the decision is read on the host: under fp16 (the gradient scaler's own
    overflow check reads it too) or with an optimizer that takes no `found_inf`."""
    scaler = state.scaler
    if bool(result.skipped):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update()  # unscale_ was called: the scaler must close the step (it lowers its scale)
        return result
    for opt in optimizers:
        scaler.step(opt)  # a disabled scaler just steps
    scaler.update()
    taken = torch.ones((), device=result.skipped.device)
    for extension in state.extensions:
        extension.after_step(state.model, state.position.step, taken)
    return result


# The objective's own loss, logged beside "loss" when extensions add terms to it.
OBJECTIVE_LOSS = "objective_loss"


def _losses(state: TrainingState, objective: Objective, micro: MicroBatch) -> tuple[dict[str, torch.Tensor], dict]:
    """The per-sample loss terms of one micro-batch: the objective's, through the network the step runs
    (with the extensions' training inputs), then each extension's terms from what it captured; "loss"
    is the objective's plus each extension term times its weight, and "objective_loss" the objective's
    own when an extension added any. Also {extension term: extension name}."""
    extensions = state.extensions
    for extension in extensions:
        micro.training_inputs.update(extension.training_inputs(micro))
    # Target passes (no gradient) run eagerly in a compiled run: dynamo cannot trace MeanFlow's JVP, and a
    # block first met there would run uncompiled in the trained forward too, for the whole run.
    target = eager(state.model) if state.config.run.compile else state.model
    network = TrainingNetwork(state.runnable, target, training_inputs=micro.training_inputs, whole_batch=state.sharded)
    conditions = {"y": micro.labels, "force_drop_ids": micro.draws.drop_labels}
    with contextlib.ExitStack() as captures:
        captured = [captures.enter_context(extension.capture(state.model)) for extension in extensions]
        terms = objective.losses(network, micro.x, micro.draws.objective, conditions)
    own, methods = terms["loss"], {}
    for extension, seen in zip(extensions, captured):
        for name, term in extension.loss_terms(micro, seen).items():
            terms[name], methods[name] = term.value, extension.name
            terms["loss"] = terms["loss"] + term.weight * term.value
    if methods:
        terms[OBJECTIVE_LOSS] = own.detach()
    return terms, methods


def _clipped_gradient_norm(state: TrainingState) -> torch.Tensor:
    """The global L2 norm of the gradient (the model's and the extensions' parameters together), after
    clipping them by it to --grad-clip when set."""
    max_norm = state.config.optimisation.grad_clip
    groups = [list(state.model.parameters()), *(e.parameters() for e in state.extensions if e.parameters())]
    if max_norm is None:
        return _gradient_norm(groups)
    if len(groups) == 1:
        return _full(torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm))
    return _clip_jointly(groups, max_norm)  # parameters trained beside the model are clipped with it


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


def learning_rate(optim, step: int) -> float:
    """The rate of optimizer step `step` (`optim`: the config's optimisation section): a linear warm-up to
    --lr, constant (DiT trains at a constant 1e-4), and with --final-lr a linear decay to it between
    --lr-decay-start and --lr-decay-end (RAE's DiT^DH schedule), constant after. A function of the step
    alone, so a resumed run follows the same rates."""
    rate = optim.lr
    if optim.final_lr is not None and step >= optim.lr_decay_start:
        progress = min(1.0, (step - optim.lr_decay_start) / (optim.lr_decay_end - optim.lr_decay_start))
        rate = optim.lr + (optim.final_lr - optim.lr) * progress
    scale = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    return rate * scale


def _set_lr(optimizer, optim, step: int) -> None:
    rate = learning_rate(optim, step)
    for group in optimizer.param_groups:
        group["lr"] = rate
