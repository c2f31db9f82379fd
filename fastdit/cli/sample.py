"""`fastdit sample`: a grid of class-conditional samples from a DiT, same seed, same picture."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError
from ..text import counted
from ..sampling.generate import GENERATE_BATCH_SIZE
from ..sampling.recipe import SAMPLING_FIELDS
from .common import (
    OFFICIAL_CLASS_LABELS,
    RecipePlan,
    add_model_arguments,
    add_sampling_arguments,
    check_output_file,
    model_arguments,
    warn_if_slow,
)

PICTURE_FIELDS = ("model", "image_size", *SAMPLING_FIELDS)
# Without --class-labels, a model of few classes shows each (the ten digits), a larger one its first 16.
MAX_DEFAULT_LABELS = 16
HELP = "sample a grid of images from a DiT (official weights or your checkpoint)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help=f"labels to sample (default: {' '.join(map(str, OFFICIAL_CLASS_LABELS))} for 1000 classes "
                             f"(DiT's sample.py), else one of each class, at most the first {MAX_DEFAULT_LABELS}: "
                             f"0..K-1)")
    parser.add_argument("--out", default="sample.png", help="grid PNG to write (default: sample.png)")
    parser.add_argument("--nrow", type=int, default=4, help="images per grid row (default: 4)")
    parser.add_argument("--batch-size", type=int, default=GENERATE_BATCH_SIZE,
                        help=f"images per sampler call; memory grows with it, not with the number of labels "
                             f"(default: {GENERATE_BATCH_SIZE})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-upscale", dest="upscale", action="store_false",
                        help="write images at their own size (default: images under 64 px, such as the 8x8 digits, "
                             "are enlarged without smoothing so the grid does not open as a speck)")


def run(args: argparse.Namespace) -> int:
    from ..image_grid import enlarge, make_grid, upscale_factor
    from ..io import atomic_save_png
    from ..loading import load_for_sampling
    from ..precision import tf32
    from ..sampling import check_labels, generate

    out = check_output_file(args.out, (".png",))
    # A picture: the sample count and label sampling of a preset do not apply (--class-labels does).
    plan = RecipePlan(args, fields=PICTURE_FIELDS)
    for flag, value in (("--nrow", args.nrow), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    model, info, latent_space, device = load_for_sampling(**model_arguments(args, plan))
    options = plan.options  # resolved with the checkpoint's recipe and checked once (`plan.options_for`)
    warn_if_slow(device, options.precision)
    num_classes = info.config.num_classes
    labels = args.class_labels
    if labels is None:
        labels = OFFICIAL_CLASS_LABELS if num_classes == 1000 else list(range(min(num_classes, MAX_DEFAULT_LABELS)))
    labels = check_labels(labels, num_classes)
    with tf32(device, args.tf32):
        images = generate(
            model, latent_space, labels, options=options, objective=info.objective, seed=args.seed, device=device,
            progress=not args.no_progress, compile=args.compile, batch_size=args.batch_size,
        )
    factor = upscale_factor(info.image_size) if args.upscale else 1
    # The resolved recipe travels in the PNG (a tEXt chunk, `PIL.Image.open(out).text["fastdit-recipe"]`).
    record = json.dumps({**plan.resolved.to_dict(PICTURE_FIELDS), "seed": args.seed, "labels": labels.tolist()}, sort_keys=True)
    atomic_save_png(enlarge(make_grid(images, nrow=args.nrow), factor), out, text={"fastdit-recipe": record})
    shown = f", shown {factor}x larger (--no-upscale: as sampled)" if factor > 1 else ""
    guidance = (f"AutoGuidance by {options.guidance_model} at {options.cfg_scale}" if options.guidance_model is not None
                and options.cfg_scale > 1 else f"cfg {options.cfg_scale}")
    print(f"wrote {out} ({len(labels)} images, {info.image_size}x{info.image_size}{shown}, "
          f"{options.resolved_sampler(info.objective)} {counted(options.num_steps, 'step')}, {guidance})")
    return 0
