"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around any model function.

guided ε = ε(x, ∅) + s · (ε(x, y) − ε(x, ∅)). The default guides every ε (or velocity) channel
and keeps the conditional learned-variance channels. DiT's `forward_with_cfg` instead guides the
first three channels of the network's whole output, `model_out[:, :3]` ("for exact reproducibility"
of the paper's numbers); that rule is the named option `guided_channels=3` (`OFFICIAL_GUIDED_CHANNELS`),
which reproduces the paper's FID 2.27 for DiT-XL/2 at 256 with `cfg_scale=1.5`. It counts channels of
the whole output, whatever C is: with C = 4 it is ε's first three; with C = 1 and a learned variance
(2 output channels) it is ε and the variance channel, as the official code does.
"""

from __future__ import annotations

import math

import torch

from ..errors import OptionError

OFFICIAL_GUIDED_CHANNELS = 3
# Published scales are 1.5 (FID) to about 10 (DiT's pictures use 4, Stable Diffusion 7.5). Each step
# multiplies the conditional-minus-unconditional difference by the scale, and DDPM's x0 estimate then
# by 1 / sqrt(alpha_bar) (about 150 at t = 999), so a large enough scale overflows float32 and gives
# NaN latents, i.e. black images. 100 is ten times any scale in use and far below where float32 gives out.
MAX_CFG_SCALE = 100.0


def check_cfg_scale(scale: float) -> float:
    """The one rule for a guidance scale: finite, in [1, MAX_CFG_SCALE] (1 is no guidance)."""
    if not math.isfinite(scale):
        raise OptionError("cfg scale must be a finite number, got {scale}", "cfg_scale", scale=scale)
    if scale > MAX_CFG_SCALE:
        raise OptionError("cfg scale {scale:g} is above {most:g}: published scales are 1.5 to about 10, and far above "
                          "them images saturate, then overflow float32; pick a scale in [1, {most:g}]", "cfg_scale",
                          scale=scale, most=MAX_CFG_SCALE)
    if scale < 1.0:
        raise OptionError("cfg scale {scale} < 1 would push samples away from their class; use 1.0 for no guidance "
                          "or a value > 1", "cfg_scale", scale=scale)
    return float(scale)


def check_guidance_interval(
    interval, time_range: tuple[float, float] | None = None, objective: str = "", time_name: str = ""
) -> tuple[float, float] | None:
    """The one rule for a guidance interval (LOW, HIGH): finite, LOW <= HIGH and, when the model's
    time range is known, inside it. None (guide every step) passes."""
    if interval is None:
        return None
    low, high = (float(v) for v in interval)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise OptionError("guidance interval ({low:g}, {high:g}) must be finite", "guidance_interval", low=low, high=high)
    if time_range is not None and not time_range[0] <= low <= high <= time_range[1]:
        raise OptionError(
            "guidance interval ({low:g}, {high:g}) must lie in this {objective} model's time range "
            "[{start:g}, {end:g}] with LOW <= HIGH{time_name}", "guidance_interval", low=low, high=high,
            objective=objective, start=time_range[0], end=time_range[1], time_name=f" ({time_name})" if time_name else "",
        )
    if low > high:
        raise OptionError("guidance interval ({low:g}, {high:g}) is reversed; give LOW <= HIGH", "guidance_interval",
                          low=low, high=high)
    return low, high


def open_at_range_ends(interval: tuple[float, float] | None, time_range: tuple[float, float]) -> tuple[float, float] | None:
    """`interval` with a side that reaches an end of the time range made unbounded; None when both do.

    An adaptive solver asks for the model at times outside the range: torchdiffeq's dopri5 steps past
    t = 1 and interpolates back to the report time. Those evaluations are points of the guided ODE
    too, so "guide up to the end" must guide them; the full range is plain
    guidance at every t, exactly as SiT's `forward_with_cfg` (Kynkäänniemi et al. 2024 bound the
    interval inside the range, where this changes nothing)."""
    if interval is None:
        return None
    low, high = interval
    low = -math.inf if low <= time_range[0] else low
    high = math.inf if high >= time_range[1] else high
    return None if (low, high) == (-math.inf, math.inf) else (low, high)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, guided_channels: int) -> torch.Tensor:
    """Combine conditional and unconditional outputs: the first `guided_channels` channels (all of
    them when there are fewer) are guided, the rest keep `cond`."""
    guided = uncond[:, :guided_channels] + scale * (cond[:, :guided_channels] - uncond[:, :guided_channels])
    return torch.cat([guided, cond[:, guided_channels:]], dim=1)


class ClassifierFreeGuidance:
    """`model(x, t, y)` -> guided `model(x, t, y)`, with the same contract as the model it wraps.

    One forward runs on the doubled batch [x, x] with labels [y, null]. The learned-variance
    channels come from the conditional half (as the official sampler effectively uses).

    `guided_channels`: None guides the first `in_channels` channels (ε or the velocity); a number k
    guides the first k channels of the whole output, the official rule with k = 3 (module docstring).

    `interval=(low, high)` guides only the rows whose time t (the process's own: DDPM timesteps
    0..999, flow time 0..1) lies in [low, high]; the others run the conditional model alone, so a
    step outside the interval is one forward on the un-doubled batch (Kynkäänniemi et al. 2024,
    "Applying guidance in a limited interval improves sample and distribution quality").
    None guides every step. With `time_range` (the process's), a side of the interval at an end of
    the range is unbounded (`open_at_range_ends`). The caller checks the interval against the range.
    """

    def __init__(
        self,
        model,
        scale: float,
        null_class: int,
        in_channels: int,
        guided_channels: int | None = None,
        interval: tuple[float, float] | None = None,
        time_range: tuple[float, float] | None = None,
    ):
        check_cfg_scale(scale)
        if guided_channels is not None and guided_channels < 1:
            raise OptionError("guided channels must be >= 1 (None guides all {channels}), got {count}", "guided_channels",
                              channels=in_channels, count=guided_channels)
        self.model = model
        self.scale = float(scale)
        self.null_class = null_class
        self.guided_channels = guided_channels or in_channels
        self.interval = check_guidance_interval(interval)
        if time_range is not None:
            self.interval = open_at_range_ends(self.interval, time_range)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **rows) -> torch.Tensor:
        """`rows`: further per-row model inputs (N, ...) (MeanFlow's `gap`), passed with their rows."""
        if self.scale == 1.0:
            return self.model(x, t, y, **rows)
        if self.interval is None:
            inside = torch.ones_like(y, dtype=torch.bool)
        else:
            inside = (t >= self.interval[0]) & (t <= self.interval[1])
            if not inside.any():
                return self.model(x, t, y, **rows)
        if inside.all():
            null = torch.full_like(y, self.null_class)
            doubled = {name: torch.cat([value, value]) for name, value in rows.items()}
            cond, uncond = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **doubled).chunk(2)
            return guide(cond, uncond, self.scale, self.guided_channels)
        # Rows at different times: every row with its label, then only the rows inside with the null label.
        null = torch.full_like(y[inside], self.null_class)
        extended = {name: torch.cat([value, value[inside]]) for name, value in rows.items()}
        out = self.model(torch.cat([x, x[inside]]), torch.cat([t, t[inside]]), torch.cat([y, null]), **extended)
        cond, uncond = out[: len(x)], out[len(x):]
        guided = cond.clone()
        guided[inside] = guide(cond[inside], uncond, self.scale, self.guided_channels)
        return guided


class AutoGuidance:
    """AutoGuidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 3):
    `model(x, t, y)` -> D_0 + w (D_1 − D_0), with D_1 the model and D_0 `guide`, a weaker model of the
    same task (smaller, or trained for less: RAE guides its DiT^DH-XL by a DiT^DH-S of 14 epochs), both
    conditioned on the label. The unconditional model of classifier-free guidance is replaced by the guide,
    so the model needs no null class, and the guidance corrects what the weaker model gets wrong rather
    than pushing away from the unconditional.

    `guided_channels`, `interval` and `time_range` as in `ClassifierFreeGuidance`: outside the interval
    the model runs alone; the guide runs only on the rows inside it. Both functions take the same (x, t, y).
    """

    def __init__(self, model, guide, scale: float, in_channels: int, guided_channels: int | None = None,
                 interval: tuple[float, float] | None = None, time_range: tuple[float, float] | None = None):
        check_cfg_scale(scale)
        self.model, self.guide = model, guide
        self.scale = float(scale)
        self.guided_channels = guided_channels or in_channels
        self.interval = check_guidance_interval(interval)
        if time_range is not None:
            self.interval = open_at_range_ends(self.interval, time_range)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **rows) -> torch.Tensor:
        """`rows`: further per-row model inputs (N, ...) (MeanFlow's `gap`), passed to both with their rows."""
        good = self.model(x, t, y, **rows)
        if self.scale == 1.0:
            return good
        if self.interval is None:
            return guide(good, self.guide(x, t, y, **rows), self.scale, self.guided_channels)
        inside = (t >= self.interval[0]) & (t <= self.interval[1])
        if not inside.any():
            return good
        if inside.all():
            return guide(good, self.guide(x, t, y, **rows), self.scale, self.guided_channels)
        weak = self.guide(x[inside], t[inside], y[inside], **{name: value[inside] for name, value in rows.items()})
        guided = good.clone()
        guided[inside] = guide(good[inside], weak, self.scale, self.guided_channels)
        return guided
