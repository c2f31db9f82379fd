"""The sampling options and their schema: one table from which every edge takes its fields.

`SamplingOptions` says how one image is sampled. Each of its fields carries an `Option`: the flag of
`fastdit sample`, the app's field, a help text, its bounds, and whether a sampling recipe (a
checkpoint's or a preset's) records it. From that table come the sampling flags of the command line
(`fastdit.cli.common`), the recipe's tables (`fastdit.sampling.recipe`), the app's fields and its
"Reproduce with" command (`fastdit.app`), and the names each edge gives an option in its messages
(`fastdit.errors.OptionError`: the library's messages speak of values, the edge names the flag or field).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from ..diffusion.flow import DIFFUSION_FORMS
from ..errors import OptionError
from ..objectives import Objective
from ..precision import PRECISIONS
from .flow import LAST_STEPS
from .guidance import MAX_CFG_SCALE, OFFICIAL_GUIDED_CHANNELS, check_cfg_scale, check_guidance_interval
from .registry import SAMPLER_OPTIONS, SDE_OPTIONS, check_sampler_options, get_sampler, sampler_names

# The official DiT sampling defaults (DiT's sample.py: 250 DDPM steps, guidance scale 4.0).
OFFICIAL_NUM_STEPS = 250
OFFICIAL_CFG_SCALE = 4.0
# The most steps one sampling may take (the DDPM process has 1000 timesteps); the fewest is the sampler's.
MAX_STEPS = 1000
# The time shift t' = t / (t + s (1 - t)) sends the middle of the grid to 1 / (1 + s): at s = 100 half
# the steps fall within the first 1% of flow time, at 1/100 within the last 1%. Published shifts are
# 1 to about 6 (SD3 uses 3); beyond [1/100, 100] the grid is a few steps and a sliver, and near 1e±38
# float32's s (1 - t) overflows or vanishes, making t' = 0/0 (NaN images).
TIME_SHIFT_RANGE = (0.01, 100.0)
# SiT's SDE: a diffusion norm scales w(t) (0: the ODE's drift, no noise; SiT's sample.py takes any value >= 0,
# and beyond 100 the noise of one step swamps the state); the last step covers (0, 1) of flow time.
DIFFUSION_NORM_RANGE = (0.0, 100.0)
LAST_STEP_SIZE_RANGE = (0.0, 1.0)

KINDS = ("choice", "int", "float", "switch", "pair", "path")


@dataclass(frozen=True)
class Option:
    """One sampling option as the edges show it.

    `kind` says how its value is written: "choice" (a name from `choices()`), "int", "float", "switch"
    (the flag alone sets the value `switch`, its `off` flag None: official guidance, 3 channels or all),
    "pair" (two numbers, LOW HIGH; the `off` flag sets None) or "path" (a file or an official name; the
    `off` flag sets None). `label` is the app's field as messages
    name it ("the Steps field"), `hint` the words after it in the page, `page_id` its element id.
    `bounds` are the lowest and highest value `SamplingOptions.validate` lets through (the steps' low
    end is the sampler's own). `recipe`: a field of a sampling recipe (what a checkpoint or preset may
    set). `always_in_command`: the app's "Reproduce with" command writes it even at its default.
    `name` and `default` are the field's, filled in from `SamplingOptions`."""

    flag: str
    label: str
    page_id: str
    help: str
    kind: str
    default_words: str = ""  # the default in words, for --help ("every step"); empty: the value itself
    hint: str = ""
    bounds: tuple[float, float] | None = None
    choices: Callable[[], tuple[str, ...]] | None = None
    switch: object = None
    off: str | None = None
    off_help: str = ""
    recipe: bool = True
    always_in_command: bool = False
    name: str = ""
    default: object = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown option kind {self.kind!r}; known: {', '.join(KINDS)}")
        if (self.off is None) != (self.kind not in ("switch", "pair", "path")):
            raise ValueError(f"{self.flag}: a switch, a pair or a path has an off flag, no other option has one")

    @property
    def dest(self) -> str:
        """The flag's attribute on argparse's namespace (--num-sampling-steps -> num_sampling_steps)."""
        return self.flag[2:].replace("-", "_")

    def command_words(self, value) -> list[str]:
        """`value` as `fastdit sample` takes it: ["--cfg-scale", "1.5"], ["--no-guidance-interval"], ...;
        [] for a choice left to the model (None). Floats are written exactly (repr)."""
        if self.kind == "switch":
            if value not in (None, self.switch):
                raise ValueError(f"{self.name}={value!r} has no flag: {self.flag} sets {self.switch!r}, {self.off} None")
            return [self.flag] if value == self.switch else [self.off]
        if self.kind == "pair":
            return [self.off] if value is None else [self.flag, *(repr(float(v)) for v in value)]
        if self.kind == "path":
            return [self.off] if value is None else [self.flag, str(value)]
        if value is None:
            return []
        if self.kind == "float":
            return [self.flag, repr(float(value))]
        return [self.flag, str(value)]


def _option(default, **metadata):
    return dataclasses.field(default=default, metadata={"option": Option(**metadata)})


@dataclass
class SamplingOptions:
    """How one image is sampled; `validate(objective)` checks the values against a model's objective.
    Each field's `Option` (`OPTIONS`) says how the edges show it."""

    sampler: str | None = _option(
        None, flag="--sampler", label="Sampler", page_id="sampler", kind="choice", choices=sampler_names,
        help="the sampling algorithm, one of those the model's objective offers", always_in_command=True,
        default_words="the model's own (ddpm for DiT, sde-euler for SiT/flow, meanflow for MeanFlow)")
    # DDPM and the grid samplers: model calls. Flow ODE/SDE samplers: grid points, as SiT counts them
    # (Euler/Heun take num_steps − 1 steps; the SDEs stop at 1 − 0.04 and add the "Mean" last step).
    num_steps: int = _option(
        OFFICIAL_NUM_STEPS, flag="--num-sampling-steps", label="Steps", page_id="steps", kind="int",
        bounds=(1, MAX_STEPS), always_in_command=True,
        help="DDPM and DDIM/DPM-Solver++: model calls; flow ODE/SDE samplers: grid points, as SiT counts them; "
             "meanflow: steps of one call each, 1 the least")
    cfg_scale: float = _option(
        OFFICIAL_CFG_SCALE, flag="--cfg-scale", label="Guidance scale", hint="(1: none)", page_id="cfg", kind="float",
        bounds=(1.0, MAX_CFG_SCALE), always_in_command=True,
        help="classifier-free guidance scale; 1 disables guidance")
    # None guides every ε/velocity channel; 3 is the official DiT/SiT rule, the first three channels of
    # the whole output for any C (paper FID 2.27 at cfg 1.5; `fastdit.sampling.guidance`).
    guided_channels: int | None = _option(
        None, flag="--official-guidance", off="--no-official-guidance", switch=OFFICIAL_GUIDED_CHANNELS,
        label="Official guidance", hint=f"(first {OFFICIAL_GUIDED_CHANNELS} channels)", page_id="official-guidance",
        kind="switch", default_words="every channel",
        help=f"guide only the first {OFFICIAL_GUIDED_CHANNELS} channels of the model's whole output, as the official "
             "DiT/SiT code does (model_out[:, :3], for any number of channels; the DiT presets do); "
             "--no-official-guidance guides every channel")
    # Guide only where the objective's time lies in [low, high] (DDPM timesteps 0..999, flow time 0..1).
    guidance_interval: tuple[float, float] | None = _option(
        None, flag="--guidance-interval", off="--no-guidance-interval", label="Guidance interval",
        hint="LOW HIGH (empty: every step)", page_id="interval", kind="pair", default_words="every step",
        help="guide only where the model's time is in [LOW, HIGH] (DDPM timesteps 0..999, flow time 0 noise..1 data); "
             "elsewhere one conditional forward",
        off_help="guide at every step, whatever the preset or recipe says")
    eta: float = _option(
        SAMPLER_OPTIONS["eta"], flag="--eta", label="DDIM eta", hint="(0: deterministic)", page_id="eta", kind="float",
        bounds=(0.0, 1.0), recipe=False, default_words="0, deterministic", help="DDIM's eta, 0 to 1; the ddim sampler only")
    time_shift: float = _option(
        1.0, flag="--time-shift", label="Time shift", hint="(flow models; 1: none)", page_id="time-shift", kind="float",
        bounds=TIME_SHIFT_RANGE, default_words="1, none",
        help="flow models: warp the time grid toward the noise end, t' = t / (t + s (1 - t))")
    # The model's forward under autocast ("bf16", "fp16"); the sampler's arithmetic stays float32.
    precision: str = _option(
        "fp32", flag="--precision", label="Precision", page_id="precision", kind="choice", choices=lambda: PRECISIONS,
        recipe=False, help="the model's forward under autocast (bf16, fp16: faster on GPUs, rounds differently); "
                           "the sampler's arithmetic stays float32")
    # SiT's SDE settings (its sample.py's --diffusion-form, --diffusion-norm, --last-step, --last-step-size),
    # for the sde-euler and sde-heun samplers (`fastdit.sampling.flow.FlowSDE`).
    diffusion_form: str = _option(
        SAMPLER_OPTIONS["diffusion_form"], flag="--diffusion-form", label="SDE diffusion", page_id="diffusion-form",
        kind="choice", choices=lambda: DIFFUSION_FORMS, recipe=False, default_words="sigma, SiT's",
        help="sde-euler, sde-heun: the diffusion w(t) of SiT's SDE dx = [v + w s] dt + sqrt(2 w) dW: constant, "
             "sbdm (the score model's reverse SDE), sigma (w = sigma_t), linear (1 - t), decreasing, "
             "increasing-decreasing; each times the norm")
    diffusion_norm: float = _option(
        SAMPLER_OPTIONS["diffusion_norm"], flag="--diffusion-norm", label="SDE diffusion norm", hint="(0: no noise)",
        page_id="diffusion-norm", kind="float", bounds=DIFFUSION_NORM_RANGE, recipe=False,
        help="sde-euler, sde-heun: the scale of w(t), 0 to 100 (0 integrates the ODE's drift without noise)")
    last_step: str = _option(
        SAMPLER_OPTIONS["last_step"], flag="--last-step", label="SDE last step", page_id="last-step", kind="choice",
        choices=lambda: LAST_STEPS, recipe=False, default_words="mean, SiT's",
        help="sde-euler, sde-heun: the noise-free step that ends the SDE at t = 1: mean (the drift), tweedie (the "
             "posterior mean of the data), euler (the velocity), none (the grid ends at 1 minus SiT's eps)")
    last_step_size: float = _option(
        SAMPLER_OPTIONS["last_step_size"], flag="--last-step-size", label="SDE last step size",
        page_id="last-step-size", kind="float", bounds=LAST_STEP_SIZE_RANGE, recipe=False,
        help="sde-euler, sde-heun: the flow time the last step covers, between 0 and 1; the grid ends at 1 minus it")
    # AutoGuidance (Karras et al. 2024): a second, weaker checkpoint in place of the unconditional model
    # (`fastdit.sampling.guidance.AutoGuidance`); the loader loads it and checks that it fits the model.
    guidance_model: str | None = _option(
        None, flag="--guidance-model", off="--no-guidance-model", label="Guidance model", page_id="guidance-model",
        kind="path", hint="(a weaker checkpoint; empty: classifier-free)", default_words="none, classifier-free",
        help="AutoGuidance: guide by this weaker model of the same latent space, classes and objective (a "
             ".pt/.safetensors file or an official name) instead of the unconditional one; --cfg-scale is its "
             "scale w, within --guidance-interval",
        off_help="classifier-free guidance, whatever the preset or recipe says")

    def resolved_sampler(self, objective: Objective) -> str:
        return self.sampler or objective.sampling.sampler

    def sampler_options(self) -> dict:
        return {name: getattr(self, name) for name in SAMPLER_OPTIONS}

    def validate(self, objective: Objective) -> None:
        """An OptionError for a value that does not fit `objective` (its sampler, guidance, time). Each
        edge calls it once; generate(), which a Python caller may reach with unchecked options, calls
        it again, and a check of the same values for the same objective returns at once."""
        values = dataclasses.astuple(self)
        checked = self.__dict__.get("_checked")
        if checked is not None and checked[0] is objective and checked[1] == values:
            return
        sampler = get_sampler(self.resolved_sampler(objective), objective)
        if not sampler.min_steps <= self.num_steps <= OPTIONS["num_steps"].bounds[1]:
            raise OptionError("number of sampling steps must be in [{low}, {high}], got {steps}", "num_steps",
                              low=sampler.min_steps, high=OPTIONS["num_steps"].bounds[1], steps=self.num_steps)
        for name in ("eta", "time_shift", "diffusion_norm", "last_step_size"):
            if not math.isfinite(getattr(self, name)):
                raise OptionError("{what} must be a finite number, got {value}", name, what=name.replace("_", " "),
                                  value=getattr(self, name))
        check_cfg_scale(self.cfg_scale)
        objective.sampling.check_guidance(self.cfg_scale, self.guidance_interval)
        if self.guidance_model is not None:
            self._check_guidance_model(objective)
        check_sampler_options(sampler, self.sampler_options())
        low, high = OPTIONS["eta"].bounds
        if not low <= self.eta <= high:
            raise OptionError("DDIM eta must be in [{low:g}, {high:g}], got {value}", "eta", low=low, high=high, value=self.eta)
        if self.time_shift != 1.0 and not objective.flow_time:
            raise OptionError("a time shift applies to flow models only (flow time); leave it at 1 for a {objective} model",
                              "time_shift", objective=objective.name)
        low, high = OPTIONS["time_shift"].bounds
        if not low <= self.time_shift <= high:
            raise OptionError("time shift must be in [{low:g}, {high:g}] (1: no shift), got {shift:g}; beyond that range "
                              "the grid puts nearly every step at one end", "time_shift", low=low, high=high,
                              shift=self.time_shift)
        check_guidance_interval(self.guidance_interval, objective.time_range, objective.name,
                                "flow time: 0 noise, 1 data" if objective.flow_time else "timesteps: 0 data, 999 noise")
        if self.precision not in PRECISIONS:
            raise OptionError("unknown precision {value!r}; choose one of {known}", "precision",
                              value=self.precision, known=", ".join(PRECISIONS))
        if set(SDE_OPTIONS) <= set(sampler.options):
            self._check_sde(sampler.name, objective)
        self.__dict__["_checked"] = (objective, values)  # not a field: asdict, == and repr leave it out

    def _check_guidance_model(self, objective: Objective) -> None:
        """AutoGuidance's settings: a named model, a scale that guides, a network that guides by sampling."""
        if not isinstance(self.guidance_model, str) or not self.guidance_model.strip():
            raise OptionError("the guidance model must be a checkpoint path or an official name, got {value!r}",
                              "guidance_model", value=self.guidance_model)
        policy = objective.sampling
        if policy.trained_guidance is not None or policy.guidance_input is not None:
            raise OptionError("this {objective} model guides itself (its guidance is trained in or an input): "
                              "leave {guidance_model} unset", "guidance_model", objective=objective.name)
        if self.cfg_scale == 1.0:
            raise OptionError("a guidance model guides at a scale above 1, but the scale is 1 (no guidance): give "
                              "{cfg_scale} (RAE: 1.42 at 256 px), or leave {guidance_model} unset", "guidance_model",
                              "cfg_scale")

    def attach_guidance_network(self, network) -> None:
        """Hand the loaded weights of `guidance_model` to the samplers (`fastdit.loading.load_for_sampling`
        loads them once and checks that they fit the model). Not a field: `asdict`, == and the recorded
        recipe hold the name, not the weights."""
        self.__dict__["_guidance_network"] = network

    @property
    def guidance_network(self):
        """The loaded guidance model (`attach_guidance_network`), or None."""
        return self.__dict__.get("_guidance_network")

    def _check_sde(self, sampler: str, objective: Objective) -> None:
        """SiT's SDE settings, and the grid they give this model (`Objective.sample_interval`)."""
        for name, known in (("diffusion_form", DIFFUSION_FORMS), ("last_step", LAST_STEPS)):
            if getattr(self, name) not in known:
                raise OptionError("unknown {what} {value!r}; choose one of: {known}", name, what=name.replace("_", " "),
                                  value=getattr(self, name), known=", ".join(known))
        low, high = OPTIONS["diffusion_norm"].bounds
        if not low <= self.diffusion_norm <= high:
            raise OptionError("diffusion norm must be in [{low:g}, {high:g}], got {value:g}", "diffusion_norm",
                              low=low, high=high, value=self.diffusion_norm)
        low, high = OPTIONS["last_step_size"].bounds
        if not low < self.last_step_size < high:
            raise OptionError("the last step size must be between {low:g} and {high:g}, got {value:g}", "last_step_size",
                              low=low, high=high, value=self.last_step_size)
        size = 0.0 if self.last_step == "none" else self.last_step_size
        _, end = objective.sample_interval(sde=True, diffusion_form=self.diffusion_form, last_step_size=size)
        if sampler == "sde-heun" and end >= 1:
            raise OptionError("without a last step the SDE of this {objective} model ends at t = 1, where stochastic "
                              "Heun would take the score, which is infinite there: choose a last step", "last_step",
                              objective=objective.name)


# The schema: each field's Option, with its name and default, in the order of the fields.
OPTIONS: dict[str, Option] = {
    field.name: dataclasses.replace(field.metadata["option"], name=field.name, default=field.default)
    for field in dataclasses.fields(SamplingOptions)
}
# The options a sampling recipe records (a checkpoint's, a preset's): what decides how one image is sampled.
RECIPE_OPTIONS = tuple(name for name, option in OPTIONS.items() if option.recipe)


def command_words(options: SamplingOptions, baseline: SamplingOptions | None = None) -> list[str]:
    """`options` as flags of `fastdit sample`: every option whose value differs from `baseline` (what the
    command takes without the flag: the checkpoint's recipe over its defaults; by default the plain
    defaults), and the ones written always (sampler, steps, guidance scale). A sampler of None (the
    model's own) is written only as the name it resolves to, so give the resolved one."""
    baseline = baseline or SamplingOptions()
    words = []
    for name, option in OPTIONS.items():
        value = getattr(options, name)
        if option.always_in_command or value != getattr(baseline, name):
            words += option.command_words(value)
    return words
