"""From labels to uint8 images: noise -> a registered sampler over the objective's view of the (guided)
model -> decode -> pixels."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..compile import compile_blocks
from ..errors import OptionError, UserError
from ..objectives import Objective
from ..precision import autocast
from .guidance import AutoGuidance, ClassifierFreeGuidance
from .noise import PerImageNoise
from .options import SamplingOptions
from .recipe import recorded_options
from .registry import EstimateFn, ModelView, get_sampler

# Images per sampler call in `generate`: memory is that of one batch (x2 with guidance), whatever the
# number of labels. sample-ddp's default per-process batch too.
GENERATE_BATCH_SIZE = 32


def check_labels(labels, num_classes: int) -> torch.Tensor:
    """int64 labels (N,), each in [0, num_classes). Floats and bools are refused, not truncated or cast
    (1.7 would silently become class 1), and so is an empty list."""
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise UserError(f"class labels must be integers, got {labels!r}"[:200]) from None
    if not labels.numel():  # before the dtype: an empty list reads as float32
        raise UserError(f"no class labels given; pass at least one label from 0 to {num_classes - 1}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise UserError(f"class labels must be integers, got {str(labels.dtype).replace('torch.', '')} values "
                        f"(first: {labels.reshape(-1)[0].item()!r}); pass whole class indices")
    labels = labels.to(torch.long).reshape(-1)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise UserError(f"class label {int(bad[0])} is outside [0, {num_classes}); pick labels from 0 to {num_classes - 1}")
    return labels


def check_finite(values: torch.Tensor, what: str, indices) -> torch.Tensor:
    """`values` (N, ...) unchanged, or a UserError when some row holds NaN or inf: such a row becomes a
    black image (a NaN pixel is cast to uint8 0), and an FID run would measure it as a result."""
    bad = (~torch.isfinite(values.reshape(len(values), -1))).any(dim=1)
    if bad.any():
        rows = [int(indices[k]) for k in bad.nonzero().flatten()[:5].tolist()]
        raise UserError(
            f"sampling gave non-finite {what} (NaN or inf) for {int(bad.sum())} of {len(values)} image(s) "
            f"(indices {', '.join(map(str, rows))}{', ...' if int(bad.sum()) > 5 else ''}); nothing is written. "
            f"The settings overflow float32 for this model: lower the guidance scale, bring the time shift toward 1, "
            f"or use precision fp32 or bf16 rather than fp16"
        )
    return values


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 exactly as DiT's sample_ddp.py converts samples:
    clamp(127.5 x + 128, 0, 255), then truncation (i.e. rounding half up of 127.5 (x + 1))."""
    images = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def with_guidance_input(model_fn, cfg_scale: float):
    """`model_fn(x, t, y)` of a network that takes its guidance scale as an input, fed `cfg_scale`."""

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **inputs) -> torch.Tensor:
        return model_fn(x, t, y, guidance=torch.full_like(t, cfg_scale, dtype=torch.float32), **inputs)

    return forward


def in_precision(model, precision: str):
    """`model(x, t, y)` with its forward under autocast and its output cast back to float32, so that
    guidance and the sampler's updates of x_t (and the noise added to it) stay float32: the ε or
    velocity is rounded once to half precision, the state is not rounded at every step."""
    if precision == "fp32":
        return model

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **rows) -> torch.Tensor:
        with autocast(x.device, precision):
            output = model(x, t, y, **rows)  # rows: MeanFlow's gap
        return output.float()

    return forward


@contextlib.contextmanager
def evaluation_mode(model):
    """`model` in eval mode inside, every submodule's own mode restored after. A DiT in train mode
    drops labels at random (its label embedder's dropout, as DiT's `LabelEmbedder.token_drop`), so
    the same seed would give other images from call to call. A plain function is left as it is."""
    if not isinstance(model, torch.nn.Module):
        yield model
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def guided_model(model, objective: Objective, options: SamplingOptions):
    """`model(x, t, y)` as samplers call it: in `options.precision`, guided when cfg_scale > 1 (with
    the interval open at the ends of the objective's time range, `open_at_range_ends`): by the
    unconditional model (classifier-free), or by `options.guidance_model` (AutoGuidance) when it names one.
    The wrappers compare the network's own times, so the interval is given to them on that clock."""
    config = model.config
    model_fn = in_precision(model, options.precision)
    interval = objective.network_interval(options.guidance_interval)
    time_range = objective.network_interval(objective.time_range)
    if objective.sampling.guidance_input is not None:  # the scale is an input: one call (improved MeanFlow)
        model_fn = with_guidance_input(model_fn, options.cfg_scale)
    elif options.guidance_model is not None and options.cfg_scale > 1.0:
        guide = options.guidance_network
        if guide is None:
            raise UserError(f"the guidance model {options.guidance_model!r} is not loaded: load the model with "
                            f"fastdit.load_for_sampling(..., options=options), which loads it and checks that it fits")
        model_fn = AutoGuidance(model_fn, in_precision(guide, options.precision), options.cfg_scale,
                                config.in_channels, options.guided_channels, interval=interval, time_range=time_range)
    elif options.cfg_scale > 1.0:
        if config.class_dropout_prob <= 0:
            raise OptionError("this model has no null class (trained without label dropout); use {cfg_scale:1}", "cfg_scale")
        model_fn = ClassifierFreeGuidance(
            model_fn, options.cfg_scale, config.null_class, config.in_channels, options.guided_channels,
            interval=interval, time_range=time_range,
        )
    return model_fn


@torch.no_grad()
def sample_latents(
    model, labels: torch.Tensor, *, objective: Objective, options: SamplingOptions, noise: PerImageNoise,
    progress: bool = False, on_estimate: EstimateFn | None = None,
) -> torch.Tensor:
    """Run the sampler (the objective's own unless `options` name one) from noise to latents (N, C, H, W),
    with the model in eval mode (its mode is restored after); `on_estimate(x̂)` sees the estimate of the
    clean latents after every model call (`ModelView`)."""
    config = model.config
    sampler = get_sampler(options.resolved_sampler(objective), objective)
    with evaluation_mode(model):
        x = noise.draw((config.in_channels, config.input_size, config.input_size))
        view = ModelView(objective, guided_model(model, objective, options), labels, learn_sigma=config.learn_sigma,
                         time_shift=options.time_shift, on_estimate=on_estimate)
        taken = {name: value for name, value in options.sampler_options().items() if name in sampler.options}
        return sampler.run(view, x, num_steps=options.num_steps, noise_fn=noise, progress=progress, **taken)


@torch.no_grad()
def generate(
    model,
    latent_space,
    labels,
    *,
    options: SamplingOptions | None = None,
    objective: Objective | None = None,
    info=None,
    seed: int = 0,
    indices=None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    compile: bool = False,
    batch_size: int = GENERATE_BATCH_SIZE,
    on_estimate: EstimateFn | None = None,
) -> np.ndarray:
    """Sample one image per label with the model's `objective` (from `load_model`'s info, or the
    training config); image k uses noise seeded by (seed, indices[k]) (default k). Labels are sampled
    `batch_size` at a time, so memory does not grow with their number; which images share a batch can
    change only the last bits of the arithmetic (see `sampling.indexed`). A batch that comes out NaN or
    inf is an error, never an image. `compile=True` compiles the model's blocks in place
    (`fastdit.compile.compile_blocks`; the first call pays the compilation). `on_estimate(x̂)`, when
    given, is called after every model call with the current batch's estimate of the clean latents
    (for previews, or to stop a run by raising); the images are bitwise those of a run without it.

    Given `info` (`load_model`'s) instead, the objective is its, and without `options` the model is
    sampled by the recipe its checkpoint records (`fastdit.sampling.recipe`; files from before recipes:
    the objective's sampler, 250 steps, cfg 4)."""
    if objective is None and info is None:
        raise ValueError("generate needs the model's objective (objective=info.objective) or its info (info=info)")
    objective = objective if objective is not None else info.objective
    if options is None:
        if info is None:
            raise ValueError("generate without options samples by the checkpoint's recipe: pass info=info")
        options = recorded_options(info)
    options.validate(objective)  # at once when the caller's edge checked them already
    if batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size}")
    if compile:
        compile_blocks(model)
    labels = check_labels(labels, model.config.num_classes).to(device)
    indices = list(range(len(labels))) if indices is None else list(indices)
    if len(indices) != len(labels):
        raise UserError(f"{len(indices)} image indices for {len(labels)} labels; give one index per label")
    images = []
    for first in range(0, len(labels), batch_size):
        rows = slice(first, first + batch_size)
        noise = PerImageNoise(seed, indices[rows], device)
        latents = sample_latents(model, labels[rows], objective=objective, options=options, noise=noise, progress=progress,
                                 on_estimate=on_estimate)
        check_finite(latents, "latents", indices[rows])
        images.append(to_uint8(check_finite(latent_space.decode(latents), "decoded images", indices[rows])))
    return np.concatenate(images)
