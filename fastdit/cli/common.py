"""Arguments and checks shared by the sampling subcommands (`sample`, `sample-ddp`, `demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from ..io import check_can_create
from ..precision import PRECISIONS, precision_warning
from .arg_types import finite_float, seed
from ..objectives import objective_names
from ..sampling import OFFICIAL_CFG_SCALE, OFFICIAL_NUM_STEPS, SamplingOptions, sampler_names, samplers_by_objective
from ..sampling.guidance import OFFICIAL_GUIDED_CHANNELS
from ..sampling.presets import get_preset, preset_names
from ..sampling.recipe import FID_CFG_SCALE, RECIPE_FIELDS, RecipeSource, checkpoint_source, resolve

OFFICIAL_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help="preset name, e.g. DiT-XL/2 (default for official weights), SiT-XL/2 (the official SiT weights), "
                            "DiT-B/4; read from --ckpt when it records it")
    group.add_argument("--image-size", type=int, default=None,
                       help="image side in pixels (official models: 256 or 512; default: 256, or what the checkpoint records)")
    group.add_argument("--num-classes", type=int, default=None, help="number of classes (default: 1000, or what the checkpoint records)")
    group.add_argument("--ckpt", default=None,
                       help="a .pt/.safetensors file or training checkpoint; default: the official DiT-XL-2-<size>.pt, downloaded on first use")
    group.add_argument("--vae", default=None, help="mse (default for official models), ema, a local diffusers AutoencoderKL folder, "
                            "or pixels for a model trained on pixels (needed only for plain state dicts)")
    group.add_argument("--objective", choices=objective_names(), default=None,
                       help="what a plain state dict was trained for: ddpm (DiT), flow (SiT), ...; checkpoints and "
                            "official weights record it")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def add_sampling_arguments(parser: argparse.ArgumentParser, *, fid: bool = False) -> None:
    """The sampling flags. Every recipe flag defaults to None (not given), so that a flag the user gave
    is told apart from a default: it overrides one field of the preset or the checkpoint's recipe
    (`fastdit.sampling.recipe`). `fid`: sample-ddp's defaults (cfg 1.5, DiT's sample_ddp.py)."""
    cfg_default = FID_CFG_SCALE if fid else OFFICIAL_CFG_SCALE
    group = parser.add_argument_group("sampling")
    group.add_argument("--preset", choices=preset_names(), default=None, metavar="NAME",
                       help="named settings behind a published FID (`fastdit presets` lists them: "
                            f"{', '.join(preset_names())}); any flag below overrides one of its values")
    group.add_argument("--sampler", choices=sampler_names(), default=None,
                       help="default: the preset's, the checkpoint's recipe, else the model's own (ddpm for DiT, "
                            "sde-euler for SiT/flow, meanflow for MeanFlow); "
                            + "; ".join(f"{k} models: {', '.join(v)}" for k, v in samplers_by_objective().items()))
    group.add_argument("--num-sampling-steps", type=int, default=None,
                       help="DDPM and DDIM/DPM-Solver++: model calls; flow ODE/SDE samplers: grid points, as SiT counts "
                            "them; meanflow: steps of one call each, 1 the least (default: the preset's or the "
                            f"checkpoint's recipe, else {OFFICIAL_NUM_STEPS})")
    group.add_argument("--cfg-scale", type=finite_float, default=None,
                       help="classifier-free guidance scale; 1 disables guidance (default: the preset's or the "
                            f"checkpoint's recipe, else {cfg_default})")
    group.add_argument("--official-guidance", action=argparse.BooleanOptionalAction, default=None,
                       help=f"guide only the first {OFFICIAL_GUIDED_CHANNELS} channels of the model's whole output, as the "
                            "official DiT/SiT code does (model_out[:, :3], for any number of channels; the DiT presets "
                            "do); --no-official-guidance guides every channel (default: every channel)")
    group.add_argument("--guidance-interval", type=finite_float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help="guide only where the model's time is in [LOW, HIGH] (DDPM timesteps 0..999, flow time "
                            "0 noise..1 data); elsewhere one conditional forward (default: every step)")
    group.add_argument("--no-guidance-interval", dest="guidance_interval", action="store_const", const=EVERY_STEP,
                       help="guide at every step, whatever the preset or recipe says")
    group.add_argument("--time-shift", type=finite_float, default=None,
                       help="flow models: warp the time grid toward the noise end, t' = t / (t + s (1 - t)) (default: 1, none)")
    group.add_argument("--eta", type=finite_float, default=0.0, help="DDIM eta (default: 0, deterministic)")
    group.add_argument("--seed", type=seed, default=0, help="seed of the noise (and of the labels); an integer >= 0 (default: 0)")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="the model's forward under autocast (bf16, fp16: faster on GPUs, rounds differently); "
                            "the sampler's arithmetic stays float32 (default: fp32)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer block (the first batch pays the compilation)")
    parser.set_defaults(_recipe_defaults={"cfg_scale": cfg_default})


EVERY_STEP = "every-step"  # --no-guidance-interval: an explicit "no interval", unlike a flag not given


def recipe_flags(args: argparse.Namespace) -> dict:
    """{recipe field: value} for the recipe flags the user gave. A flag not given is None; the two
    that can say "none" on purpose (--no-official-guidance: every channel; --no-guidance-interval:
    every step) give the value None."""
    interval = args.guidance_interval
    given = {
        "model": args.model,
        "image_size": args.image_size,
        "sampler": args.sampler,
        "num_steps": args.num_sampling_steps,
        "cfg_scale": args.cfg_scale,
        "guided_channels": {True: OFFICIAL_GUIDED_CHANNELS, False: _NONE}.get(args.official_guidance),
        "guidance_interval": _NONE if interval == EVERY_STEP else tuple(interval) if interval is not None else None,
        "time_shift": args.time_shift,
        "label_sampling": getattr(args, "label_sampling", None),
        "num_samples": getattr(args, "num_fid_samples", None),
    }
    return {name: None if value is _NONE else value for name, value in given.items() if value is not None}


_NONE = object()  # a flag that sets a field to None (not "not given")


class RecipePlan:
    """The recipe of one sampling job: the preset and the flags are known before the model is loaded,
    the checkpoint's recipe once its metadata is read (`options_for`, called by the loader). `fields`
    are the recipe fields the command uses (`fastdit sample` has no sample count or label sampling)."""

    def __init__(self, args: argparse.Namespace, fields=RECIPE_FIELDS):
        self.preset = get_preset(args.preset) if args.preset else None
        self.flags = recipe_flags(args)
        self.fields = fields
        self.defaults = dict(args._recipe_defaults)
        self.eta, self.precision = args.eta, args.precision
        self.from_checkpoint = args.ckpt is not None
        self.announce = True  # print the first line (sample-ddp: the main process only)
        self.resolved = resolve(self.defaults, self._preset_source(), self.flags)
        self.options = self.resolved.options(eta=self.eta, precision=self.precision)

    def _preset_source(self) -> RecipeSource | None:
        if self.preset is None:
            return None
        source = self.preset.as_source()
        if self.from_checkpoint:  # the preset's model and size pick official weights; a checkpoint records its own
            values = {k: v for k, v in source.values.items() if k not in ("model", "image_size")}
            source = RecipeSource(source.what, values, preset=source.preset)
        return source

    @property
    def model_name(self) -> str | None:
        return self.resolved["model"]

    @property
    def image_size(self) -> int | None:
        return self.resolved["image_size"]

    def options_for(self, info) -> SamplingOptions:
        """The options for the loaded model: the preset's, else its checkpoint's recipe, then the flags;
        checked against its objective; the job's first line says where they came from."""
        source = self._preset_source() or checkpoint_source(info.sampling)
        self.resolved = resolve(self.defaults, source, self.flags)
        self.options = self.resolved.options(eta=self.eta, precision=self.precision)
        try:
            self.options.validate(info.objective)
        except UserError as err:
            if self.preset is None:
                raise
            raise UserError(f"preset {self.preset.name} (for {self.preset.objective} models): {err}") from None
        if self.announce:
            print(self.resolved.describe(self.fields, own_sampler=self.options.resolved_sampler(info.objective)), flush=True)
        return self.options


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The options the flags and the command's defaults give, before any preset or checkpoint recipe."""
    return RecipePlan(args).options


def warn_if_slow(device, precision: str) -> None:
    """One line on stderr when `precision` is slower than fp32 on `device` (`fastdit.precision`)."""
    warning = precision_warning(device, precision)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def check_output_file(path: str, suffixes: tuple[str, ...]) -> Path:
    """Fail before any work if `path` cannot be written (so nothing is computed for nothing)."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise UserError(f"output {path!r} should end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise UserError(f"output {path!r} is a folder; give a file name")
    check_can_create(out.parent if str(out.parent) else Path("."))
    return out


def load_for_sampling(args: argparse.Namespace, plan: RecipePlan | None = None):
    """(model, info, latent space, device) for the model flags (`fastdit.loading.load_for_sampling`);
    with a `plan`, its model and size (a preset's) pick the official weights, and its options are
    resolved with the checkpoint's recipe and checked against the model's objective before the VAE is loaded."""
    from ..loading import load_for_sampling as load

    model_name = plan.model_name if plan is not None else args.model
    image_size = plan.image_size if plan is not None else args.image_size
    if args.ckpt is not None:  # a preset's model does not apply to a checkpoint (it records its own)
        model_name, image_size = args.model, args.image_size
    return load(args.ckpt, model_name=model_name, image_size=image_size, num_classes=args.num_classes,
                vae=args.vae, objective=args.objective, device=args.device,
                options=plan.options_for if plan is not None else None)
