"""`fastdit sample-ddp`: sample many images (e.g. 50,000 for FID) into an ADM-compatible `.npz`.

    fastdit sample-ddp --num-fid-samples 50000 --out samples/dit-xl2-256.npz
    torchrun --nproc_per_node 8 -m fastdit sample-ddp --num-fid-samples 50000 --out samples/dit-xl2-256.npz

Image i's noise and label depend only on --seed and i. On one machine, the same --batch-size and
--chunk-size give the same bytes whatever the number of processes; another --batch-size may round the
last bits differently (a pixel may move by one level). Run the same command again to continue a killed
run; one run at a time per output. See `fastdit.sample_ddp.runner` for the design.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..sampling.recipe import LABEL_SAMPLINGS
from .common import RecipePlan, add_model_arguments, add_sampling_arguments, check_output_file, model_arguments, warn_if_slow

HELP = "sample many images (e.g. 50,000 for FID) into an ADM .npz, with torchrun, resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, fid=True)  # cfg 1.5 by default: DiT's sample_ddp.py, for FID
    group = parser.add_argument_group("output")
    group.add_argument("--num-fid-samples", type=int, default=None,
                       help="number of images (default: the preset's, else 50000)")
    group.add_argument("--label-sampling", choices=LABEL_SAMPLINGS, default=None,
                       help="random: each image's label drawn from --seed and its index, as DiT's sample_ddp.py; "
                            "equal: every class N / num_classes times, in an order fixed by --seed (N must be a "
                            "multiple of the number of classes) (default: the preset's, else random)")
    group.add_argument("--out", default="samples.npz",
                       help="ADM .npz to write: arr_0 uint8 N×H×W×3, arr_1 int64 labels (default: samples.npz). "
                            "Work in progress lives in <out>.parts/; the settings end up in <out>.json")
    group.add_argument("--class-labels", type=int, nargs="+", default=None,
                       help="labels to cycle over the images (default: --label-sampling over all classes)")
    group.add_argument("--png-dir", default=None, help="also write every image as <png-dir>/<index:06d>.png; a new or "
                            "empty folder, or the one an earlier run of this --out made")
    group.add_argument("--batch-size", type=int, default=None,
                       help=f"images per batch and process (default: --recipe's, else {JOB_DEFAULTS['batch_size']}). With "
                            "the same batch and chunk size, any number of processes writes the same bytes; another batch "
                            "size may round the last bits differently")
    group.add_argument("--chunk-size", type=int, default=None,
                       help=f"images per chunk: the unit of work sharing and resuming (default: --recipe's, else "
                            f"{JOB_DEFAULTS['chunk_size']})")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(seed=None)  # not given: --recipe's seed, else 0


# The job's settings a recipe file may set (`fastdit.sampling.recipe.JOB_FIELDS`), when no flag does.
JOB_DEFAULTS = {"seed": 0, "batch_size": 32, "chunk_size": 1000}


def job_settings(args: argparse.Namespace, recipe_file) -> dict:
    """--seed, --batch-size and --chunk-size: the flag, else the recipe file's, else the default."""
    recorded = recipe_file.job if recipe_file is not None else {}
    return {name: getattr(args, name) if getattr(args, name) is not None else recorded.get(name, default)
            for name, default in JOB_DEFAULTS.items()}


def run(args: argparse.Namespace) -> int:
    from .. import distributed as dist
    from ..devices import resolve_device
    from ..loading import load_for_sampling
    from ..sample_ddp import SampleJob, sample_ddp

    from ..errors import UserError

    plan = RecipePlan(args)
    if args.class_labels is not None and args.label_sampling is not None:
        raise UserError("--class-labels and --label-sampling exclude each other: give the labels, or how to draw them")
    if args.class_labels is not None:  # given labels replace the recipe's label sampling: recorded as a change
        plan.resolved.note_override("label_sampling", "--class-labels", args.class_labels)
    settings = job_settings(args, plan.recipe_file)
    job = SampleJob(
        out=check_output_file(args.out, (".npz",)),
        num_samples=plan.resolved["num_samples"],  # a checkpoint's recipe never sets it: known before loading
        options=plan.options,
        seed=settings["seed"],
        label_sampling=plan.resolved["label_sampling"],
        batch_size=settings["batch_size"],
        chunk_size=settings["chunk_size"],
        class_labels=args.class_labels,
        png_dir=Path(args.png_dir) if args.png_dir else None,
        progress=args.progress,
        compile=args.compile,
        tf32=args.tf32,
    )
    resolve_device(args.device)  # a bad --device is a one-line error, before joining the process group
    info = dist.init_from_env(args.device)
    if info.is_main:
        warn_if_slow(info.device, job.options.precision)
    plan.announce = info.is_main  # the first line, once
    # One GPU per process: load onto this process's device, not the first GPU.
    per_process = argparse.Namespace(**{**vars(args), "device": str(info.device)})

    def load():
        loaded = load_for_sampling(**model_arguments(per_process, plan))
        # The options are final once the checkpoint's recipe is read: the job samples and records them.
        job.options, job.recipe = plan.options, plan.resolved.to_dict()
        return loaded

    # On an error, leave without the closing barrier: the others stop too (see `_on_main_first`), or torchrun stops them.
    report = sample_ddp(job, load, info)
    dist.shutdown()
    if report is not None:
        size = f"{report.image_size}x{report.image_size}"
        if report.was_complete:
            print(f"{str(report.out)!r} is complete ({report.num_samples} images, {size}); nothing to do")
        else:
            speed = f" in {report.seconds:.1f} s ({report.images_per_second:.2f} images/s on" if report.sampled else " (on"
            print(f"wrote {str(report.out)!r}: {report.num_samples} images, {size}; sampled {report.sampled} now"
                  f"{speed} {report.world_size} process(es))")
    return 0
