"""Arguments and checks shared by the sampling subcommands (`sample`, `sample-ddp`, `demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import OptionError, UserError
from ..io import check_can_create
from ..precision import precision_warning
from .arg_types import finite_float, seed
from ..objectives import objective_names
from ..sampling import OFFICIAL_CFG_SCALE, OPTIONS, Option, SamplingOptions, samplers_by_objective
from ..sampling.presets import check_fits_official_weights, get_preset, preset_names
from ..sampling.recipe import FID_CFG_SCALE, RECIPE_FIELDS, RecipeSource, checkpoint_source, read_recipe_file, resolve

OFFICIAL_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help="preset name, e.g. DiT-XL/2 (default for official weights), SiT-XL/2 (the official SiT weights), "
                            "DiTDH-XL (RAE's official DiT^DH weights), DiT-B/4; read from --ckpt when it records it")
    group.add_argument("--image-size", type=int, default=None,
                       help="image side in pixels (official models: 256 or 512; default: 256, or what the checkpoint records)")
    group.add_argument("--num-classes", type=int, default=None, help="number of classes (default: 1000, or what the checkpoint records)")
    group.add_argument("--ckpt", default=None,
                       help="a .pt/.safetensors file or training checkpoint; default: the official DiT-XL-2-<size>.pt, downloaded on first use")
    group.add_argument("--vae", default=None, help="mse (default for official DiT/SiT models), ema, a local diffusers AutoencoderKL folder, "
                            "an RAE latent space (rae:dinov2-b-reg, rae:dinov2-b-reg-512, rae:FOLDER; RAE's releases "
                            "default to theirs), or pixels for a model trained on pixels (needed only for plain state dicts)")
    group.add_argument("--objective", choices=objective_names(), default=None,
                       help="what a plain state dict was trained for: ddpm (DiT), flow (SiT), ...; checkpoints and "
                            "official weights record it")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def add_sampling_arguments(parser: argparse.ArgumentParser, *, fid: bool = False) -> None:
    """The sampling flags, one per `SamplingOptions` field (`fastdit.sampling.options`), and the job's
    --preset, --seed and --compile. Every recipe flag defaults to None (not given), so that a flag the
    user gave is told apart from a default: it overrides one field of the preset or the checkpoint's
    recipe (`fastdit.sampling.recipe`). `fid`: sample-ddp's defaults (cfg 1.5, DiT's sample_ddp.py)."""
    cfg_default = FID_CFG_SCALE if fid else OFFICIAL_CFG_SCALE
    group = parser.add_argument_group("sampling")
    group.add_argument("--preset", choices=preset_names(), default=None, metavar="NAME",
                       help="named settings behind a published FID (`fastdit presets` lists them: "
                            f"{', '.join(preset_names())}); any flag below overrides one of its values")
    group.add_argument("--recipe", default=None, metavar="FILE",
                       help="settings written in a recipe file (the one `fastdit sweep` writes for its best point), in "
                            "place of a preset: its values, its weights when --ckpt is not given and, for sample-ddp, "
                            "its seed, batch and chunk size, so that it writes the images the recipe was measured on; "
                            "any flag overrides one of them")
    by_objective = "; ".join(f"{k} models: {', '.join(v)}" for k, v in samplers_by_objective().items())
    for option in OPTIONS.values():
        default = cfg_default if option.name == "cfg_scale" else option.default
        add_option_argument(group, option, default=default, more=by_objective if option.name == "sampler" else "")
    group.add_argument("--seed", type=seed, default=0, help="seed of the noise (and of the labels); an integer from 0 to 2^64 - 1 (default: 0)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer block (the first batch pays the compilation)")
    group.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                       help="TF32 matmuls on CUDA GPUs (Ampere and newer), as DiT's sample_ddp.py: several times faster "
                            "than full float32, which rounds each matmul's inputs to 10 mantissa bits; --no-tf32 for "
                            "full float32 (default: on; no effect on a CPU)")
    parser.set_defaults(_recipe_defaults={"cfg_scale": cfg_default}, _option_flags=OPTION_FLAGS)


# How `fastdit sample` and `sample-ddp` name each sampling option in messages (`OptionError.at_edge`).
OPTION_FLAGS = {name: option.flag for name, option in OPTIONS.items()}
EVERY_STEP = "every-step"  # --no-guidance-interval: an explicit "no interval", unlike a flag not given
NO_PATH = object()  # --no-guidance-model: an explicit "none" (any string could be a file's name)


def add_option_argument(group, option: Option, *, default, more: str = "") -> None:
    """The flag of one sampling option, as its kind writes it; a recipe option's flag defaults to None
    (not given), the others to `default`. `more`: words after its help (the samplers of each objective)."""
    default_words = option.default_words or str(default)
    if option.recipe:
        default_words = f"the preset's or the checkpoint's recipe, else {default_words}"
    text = f"{option.help}{'; ' + more if more else ''} (default: {default_words})"
    given = None if option.recipe else default
    if option.kind == "choice":
        group.add_argument(option.flag, choices=option.choices(), default=given, help=text)
    elif option.kind == "int":
        group.add_argument(option.flag, type=int, default=given, help=text)
    elif option.kind == "float":
        group.add_argument(option.flag, type=finite_float, default=given, help=text)
    elif option.kind == "switch":  # --official-guidance / --no-official-guidance
        group.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=given, help=text)
    elif option.kind == "path":  # --guidance-model CKPT, or --no-guidance-model
        group.add_argument(option.flag, default=given, metavar="CKPT", help=text)
        group.add_argument(option.off, dest=option.dest, action="store_const", const=NO_PATH, help=option.off_help)
    else:  # a pair: --guidance-interval LOW HIGH, or --no-guidance-interval
        group.add_argument(option.flag, type=finite_float, nargs=2, metavar=("LOW", "HIGH"), default=given, help=text)
        group.add_argument(option.off, dest=option.dest, action="store_const", const=EVERY_STEP, help=option.off_help)


def flag_value(option: Option, given):
    """The value an option's flag gave (`_NOT_GIVEN` for a flag not given): a switch's True is its
    value, its --no- form None; a pair's and a path's --no- form None."""
    if given is None:
        return _NOT_GIVEN
    if option.kind == "switch":
        return option.switch if given else None
    if option.kind == "pair":
        return None if given == EVERY_STEP else tuple(given)
    if option.kind == "path":
        return None if given is NO_PATH else given
    return given


def recipe_flags(args: argparse.Namespace) -> dict:
    """{recipe field: value} for the recipe flags the user gave. A flag not given is None on the
    namespace; the three that can say "none" on purpose (--no-official-guidance: every channel;
    --no-guidance-interval: every step; --no-guidance-model: classifier-free) give the value None."""
    job = {"model": args.model, "image_size": args.image_size, "label_sampling": getattr(args, "label_sampling", None),
           "num_samples": getattr(args, "num_fid_samples", None)}
    given = {name: flag_value(OPTIONS[name], getattr(args, OPTIONS[name].dest)) if name in OPTIONS
             else _NOT_GIVEN if job[name] is None else job[name] for name in RECIPE_FIELDS}
    return {name: value for name, value in given.items() if value is not _NOT_GIVEN}


_NOT_GIVEN = object()  # a flag not given (None is a value: every channel, every step)


class RecipePlan:
    """The recipe of one sampling job: the preset and the flags are known before the model is loaded,
    the checkpoint's recipe once its metadata is read (`options_for`, called by the loader). `fields`
    are the recipe fields the command uses (`fastdit sample` has no sample count or label sampling)."""

    def __init__(self, args: argparse.Namespace, fields=RECIPE_FIELDS):
        if args.preset and getattr(args, "recipe", None):
            raise UserError("--preset and --recipe are both a source of settings: give one of them")
        self.preset = get_preset(args.preset) if args.preset else None
        # A recipe file stands where a preset would; its weights are the job's unless --ckpt names others.
        self.recipe_file = read_recipe_file(args.recipe) if getattr(args, "recipe", None) else None
        self.ckpt = args.ckpt if args.ckpt is not None or self.recipe_file is None else self.recipe_file.ckpt
        if self.ckpt is not None:
            self.ckpt = str(self.ckpt)
        self.flags = recipe_flags(args)
        self.fields = fields
        self.defaults = dict(args._recipe_defaults)
        # The options a recipe does not hold (eta, precision): their flags' values, defaults included.
        self.others = {name: getattr(args, option.dest) for name, option in OPTIONS.items() if not option.recipe}
        self.from_checkpoint = self.ckpt is not None
        self.announce = True  # print the first line (sample-ddp: the main process only)
        self.resolved = resolve(self.defaults, self._preset_source(), self.flags)
        self.options = self.resolved.options(**self.others)
        if self.ckpt is None:  # official weights: the preset must fit them, before they are downloaded
            check_fits_official_weights(self.preset, self.model_name)

    def _preset_source(self) -> RecipeSource | None:
        if self.recipe_file is not None:
            return self.recipe_file.as_source()
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
        checked against its objective (the command's one check: generate() does not repeat it); the
        job's first line says where they came from."""
        source = self._preset_source() or checkpoint_source(info.sampling)
        self.resolved = resolve(self.defaults, source, self.flags)
        self.options = self.resolved.options(**self.others)
        try:
            self.options.validate(info.objective)
        except UserError as err:
            if self.preset is None and self.recipe_file is None:
                raise
            context = (f"preset {self.preset.name} (for {self.preset.objective} models): " if self.preset else
                       f"recipe file {str(self.recipe_file.path)!r}: ")
            raise (err.within(context) if isinstance(err, OptionError) else UserError(f"{context}{err}")) from None
        if self.announce:
            print(self.resolved.describe(self.fields, own_sampler=self.options.resolved_sampler(info.objective)), flush=True)
        return self.options


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


def model_arguments(args: argparse.Namespace, plan: RecipePlan | None = None) -> dict:
    """The model flags as `fastdit.loading.load_for_sampling`'s arguments; with a `plan`, its model and
    size (a preset's) pick the official weights, and its `options_for` resolves the options with the
    checkpoint's recipe and checks them against the model's objective before the VAE is loaded."""
    model_name = plan.model_name if plan is not None else args.model
    image_size = plan.image_size if plan is not None else args.image_size
    ckpt = plan.ckpt if plan is not None else args.ckpt  # --ckpt, else a recipe file's weights
    if ckpt is not None:  # a preset's model does not apply to a checkpoint (it records its own)
        model_name, image_size = args.model, args.image_size
    return dict(source=ckpt, model_name=model_name, image_size=image_size, num_classes=args.num_classes,
                vae=args.vae, objective=args.objective, device=args.device,
                options=plan.options_for if plan is not None else None)
