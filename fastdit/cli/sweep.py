"""`fastdit sweep`: sample and score every combination of the settings given, confirm the best with the
full count, and write a table, a plot and the winner's recipe.

    fastdit sweep --run-dir results/my-run --ema last 0.05 0.1 0.15 --cfg-scale 1.25 1.5 1.75 \\
        --ref VIRTUAL_imagenet256_labeled.npz --num-samples 5000 --confirm 2 --confirm-samples 50000 --out sweeps/my-run
    torchrun --nproc_per_node 8 -m fastdit sweep ...       # the same table, faster
    fastdit sample-ddp --recipe sweeps/my-run/recipe.json --out best.npz   # the winner, byte for byte

Every setting flag takes one value (fixed) or several (swept); see `fastdit.sweep` for the design.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..sampling import OPTIONS
from ..sampling.recipe import LABEL_SAMPLINGS
from .arg_types import finite_float, positive_int, seed

HELP = "find the sampling settings (EMA length, guidance, steps) that score best, cheaply, and write them as a recipe"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..sampling.presets import preset_names
    from ..sweep.scoring import METRICS

    source = parser.add_argument_group("what to sweep (one of)")
    exclusive = source.add_mutually_exclusive_group(required=True)
    exclusive.add_argument("--run-dir", metavar="DIR", help="a training run folder: its last EMA export, and with "
                                                        "--posthoc-ema snapshots, an EMA of any length (named so that torchrun does not take it for its --run-path)")
    exclusive.add_argument("--ckpt", metavar="FILE", help="one checkpoint or export")
    parser.add_argument("--out", default="sweep", metavar="DIR",
                        help="the sweep's folder: state, samples, table, plot, recipe; run the same command again to "
                             "continue a killed sweep, with more values to extend it (default: sweep)")

    axes = parser.add_argument_group("settings: one value is fixed, several are swept (every combination)")
    axes.add_argument("--ema", nargs="+", default=["last"], metavar="EMA",
                      help="last (the run's newest EMA export, or --ckpt), an EMA length σ_rel such as 0.1 (made from "
                           "the run's post-hoc snapshots, as `fastdit ema` makes it), or the path of an export "
                           "(default: last)")
    axes.add_argument("--ema-step", type=positive_int, default=None, metavar="N",
                      help="the step the EMA lengths average up to (default: the last snapshot's)")
    for name, metavar, kind in (("cfg_scale", "SCALE", finite_float), ("num_steps", "N", int),
                                ("time_shift", "S", finite_float)):
        option = OPTIONS[name]
        axes.add_argument(option.flag, dest=name, nargs="+", type=kind, default=None, metavar=metavar,
                          help=f"{option.help} (default: the preset's or the checkpoint's recipe)")
    axes.add_argument(OPTIONS["sampler"].flag, dest="sampler", nargs="+", choices=OPTIONS["sampler"].choices(),
                      default=None, metavar="NAME",
                      help=f"{OPTIONS['sampler'].help}: {', '.join(OPTIONS['sampler'].choices())} (default: the "
                           "preset's or the checkpoint's recipe)")
    axes.add_argument("--guidance-interval", dest="guidance_interval", nargs="+", default=None, metavar="LOW:HIGH",
                      help="guide only where the model's time is in [LOW, HIGH] (DDPM timesteps 0..999, flow time "
                           "0 noise..1 data); none: at every step (default: the preset's or the checkpoint's recipe)")
    option = OPTIONS["guided_channels"]
    axes.add_argument(option.flag, dest="guided_channels", action=argparse.BooleanOptionalAction, default=None,
                      help=f"{option.help} (fixed for every point)")
    axes.add_argument("--preset", choices=preset_names(), default=None, metavar="NAME",
                      help="a sampling preset's settings under every point, in place of the checkpoint's recipe "
                           f"({', '.join(preset_names())})")

    metric = parser.add_argument_group("metric")
    metric.add_argument("--metric", choices=METRICS, default="mind",
                        help="what ranks the points, lower is better: mind (sliced Wasserstein on Inception features, "
                             "arXiv 2605.06797: 5K samples rank as FID-50K), fid, or digits (the demo's judge: "
                             "Fréchet distance in the digit classifier's features) (default: mind)")
    metric.add_argument("--ref", default=None, metavar="PATH",
                        help="mind, fid: the reference (an ADM .npz batch, an image folder, or statistics from "
                             "`fastdit evaluate --make-ref --metrics fid,mind`)")
    metric.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="local Inception-v3 weights (default: downloaded once into the fastdit cache)")
    metric.add_argument("--num-samples", type=positive_int, default=5000, metavar="N",
                        help="images per point (default: 5000)")
    metric.add_argument("--confirm", type=int, default=2, metavar="K",
                        help="sample the best K points again with --confirm-samples; the best of those wins (0: "
                             "the best point wins as it is) (default: 2)")
    metric.add_argument("--confirm-samples", type=positive_int, default=50_000, metavar="N",
                        help="images of each confirmation, the count the number is quoted at (default: 50000)")

    job = parser.add_argument_group("sampling")
    job.add_argument("--label-sampling", choices=LABEL_SAMPLINGS, default=None,
                     help="random (each image's label drawn from the seed and its index) or equal (every class "
                          "N / num_classes times) (default: the preset's, else random)")
    job.add_argument("--seed", type=seed, default=0, help="the noise and labels of every point (default: 0)")
    job.add_argument("--batch-size", type=positive_int, default=32, help="images per batch and process (default: 32)")
    job.add_argument("--chunk-size", type=positive_int, default=1000,
                     help="images per chunk, the unit of resuming a point (default: 1000)")
    job.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    job.add_argument("--keep-samples", action="store_true",
                     help="keep every point's .npz (default: only the confirmations', the others are dropped once scored)")
    job.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    from .common import OPTION_FLAGS

    parser.set_defaults(_option_flags=OPTION_FLAGS)


def space_from_args(args: argparse.Namespace):
    from ..sweep import SweepSpace, parse_ema, parse_interval
    from ..sweep.space import RECIPE_AXES

    axes = {}
    for name in RECIPE_AXES:
        values = getattr(args, name)
        if values is not None:
            axes[name] = tuple(parse_interval(v) for v in values) if name == "guidance_interval" else tuple(values)
    return SweepSpace(ema=tuple(parse_ema(word) for word in args.ema), axes=axes)


def run(args: argparse.Namespace) -> int:
    import shlex

    from .. import distributed as dist
    from ..devices import resolve_device
    from ..program import program_words
    from ..sampling.options import OFFICIAL_GUIDED_CHANNELS
    from ..sampling.presets import get_preset
    from ..sweep import SweepJob, SweepSource, run_sweep

    preset = get_preset(args.preset) if args.preset else None
    fixed = {} if args.guided_channels is None else {
        "guided_channels": OFFICIAL_GUIDED_CHANNELS if args.guided_channels else None}
    job = SweepJob(
        out=Path(args.out),
        source=SweepSource(run=Path(args.run_dir) if args.run_dir else None, ckpt=Path(args.ckpt) if args.ckpt else None,
                           ema_step=args.ema_step),
        space=space_from_args(args), metric=args.metric, ref=args.ref, inception_weights=args.inception_weights,
        preset=args.preset, fixed=fixed, num_samples=args.num_samples, confirm=args.confirm,
        confirm_samples=args.confirm_samples, seed=args.seed, batch_size=args.batch_size, chunk_size=args.chunk_size,
        label_sampling=args.label_sampling or (preset.recipe.get("label_sampling") if preset else None) or "random",
        keep_samples=args.keep_samples, progress=args.progress,
    )
    job.validate()  # before joining a process group: a bad flag is one line from every process
    resolve_device(args.device)
    info = dist.init_from_env(args.device)
    result = run_sweep(job, info)
    dist.shutdown()
    if result is None:
        return 0
    print("\n".join(result.table))
    print(f"\n{result.sampled} sample sets made now, {result.before} points scored before; files in {job.out}:")
    for name, path in result.files.items():
        print(f"  {name:<7} {path}")
    command = [*program_words(), "sample-ddp", "--recipe", str(result.files["recipe"]), "--out", "best.npz"]
    print(f"the winner, {result.winner.point.name}, byte for byte: {shlex.join(command)}")
    return 0
