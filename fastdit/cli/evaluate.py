"""`fastdit evaluate SAMPLES REF`: FID, sFID, Inception Score, precision and recall, as ADM defines them,
and FD-DINOv2 as Stein et al. 2023 define it (`--metrics fid,sfid,is,pr,fd-dinov2`).

SAMPLES and REF are each an ADM `.npz` batch (uint8 `arr_0`, N x H x W x 3; precomputed `mu`,
`sigma`, `mu_s`, `sigma_s` are used when present), an image folder, or a statistics file written by
`fastdit evaluate --make-ref SOURCE OUT.npz` (which stores the DINOv2 moments too when `--metrics`
names fd-dinov2).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UserError
from ..evaluate.dinov2 import FD_DINOV2_ENCODER
from ..evaluate.metrics import PR_DISTANCES
from ..evaluate.statistics import ADM_METRICS, METRICS

HELP = (
    "FID, sFID, Inception Score, precision and recall of samples against a reference (ADM evaluator "
    "definitions), and FD-DINOv2"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "samples",
        metavar="SAMPLES",
        help="samples: .npz batch, image folder or statistics file (with --make-ref: the reference images)",
    )
    parser.add_argument(
        "ref",
        metavar="REF",
        help="reference: .npz batch (e.g. VIRTUAL_imagenet256_labeled.npz), image folder or statistics file "
        "(with --make-ref: the statistics file OUT.npz to write)",
    )
    parser.add_argument(
        "--make-ref",
        action="store_true",
        help="write reference statistics of SAMPLES (a folder or .npz) to REF (.npz) instead of comparing",
    )
    parser.add_argument(
        "--metrics",
        default=",".join(ADM_METRICS),
        metavar="LIST",
        help=f"comma-separated metrics among {','.join(METRICS)} (default {','.join(ADM_METRICS)}); fd-dinov2 is "
        "the Frechet distance on DINOv2 ViT-L/14 features (Stein et al. 2023); with --make-ref, fd-dinov2 "
        "stores its statistics in the reference file too",
    )
    parser.add_argument(
        "--fd-dinov2-encoder",
        default=FD_DINOV2_ENCODER,
        metavar="SPEC",
        help=f"the encoder for fd-dinov2 (default {FD_DINOV2_ENCODER}, downloaded once into the fastdit cache); "
        f"{FD_DINOV2_ENCODER}=FILE.safetensors for a local copy of timm's weights, or a TorchScript file",
    )
    parser.add_argument("--out-json", metavar="PATH.json", help="also write the metrics as JSON")
    parser.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="local Inception-v3 2015-12-05 weights (pytorch-fid's pt_inception-... or torch-fidelity's "
        "weights-inception-... .pth); default: download once into the fastdit cache",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per forward pass of Inception (and of DINOv2 for fd-dinov2; default 64)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    parser.add_argument(
        "--pr-subset",
        type=int,
        default=0,
        metavar="N",
        help="use only the first N images per side for precision/recall (default 0: all of them, as ADM)",
    )
    parser.add_argument(
        "--pr-distances",
        choices=PR_DISTANCES,
        default="float16",
        help="arithmetic of the precision/recall distances: float16 is ADM's and reproduces its published "
        "numbers (default); float32 ties less often with the k-NN radii and gives slightly lower values",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_make_ref_output(source: Path, ref: str) -> Path:
    """Where --make-ref writes; refuse its own input or any file that is not a fastdit statistics file."""
    from ..evaluate.sources import is_statistics_file
    from ..evaluate.statistics import statistics_file_name
    from ..io import check_can_create

    output = statistics_file_name(ref)
    for target in (Path(ref).expanduser(), output):
        if target.exists() and os.path.samefile(source, target):
            raise UserError(
                f"--make-ref would write over its own input {str(source)!r}; give REF a new name, e.g. ref_stats.npz"
            )
    if output.is_dir():
        raise UserError(f"--make-ref output {str(output)!r} is a folder; give a file name such as ref_stats.npz")
    if output.exists() and not is_statistics_file(output):
        raise UserError(
            f"refusing to overwrite {str(output)!r}: it is not a statistics file written by fastdit; "
            "give REF a new name or delete that file yourself"
        )
    check_can_create(output.parent)
    return output


def _image_size(path, role: str, needs_dinov2: bool) -> tuple[int, int] | None:
    """The resolution of a statistics file, `.npz` batch or folder, read without running a network;
    a statistics file asked for FD-DINOv2 must carry its moments."""
    from ..evaluate import load_statistics
    from ..evaluate.sources import is_statistics_file, open_images

    if not is_statistics_file(path):
        return open_images(path).image_size
    stats = load_statistics(path)
    if needs_dinov2:
        stats.require_dinov2(role)
    return stats.image_size


def format_table(metrics: dict) -> str:
    """One row per metric in `metrics` (as `compare` returns them); n/a where a value is None."""
    rows = [
        ("Inception Score", "inception_score", "{:.2f}"),
        ("FID", "fid", "{:.4f}"),
        ("sFID", "sfid", "{:.4f}"),
        ("Precision", "precision", "{:.4f}"),
        ("Recall", "recall", "{:.4f}"),
        ("FD-DINOv2", "fd_dinov2", "{:.4f}"),
    ]
    rows = [(name, metrics[key], fmt) for name, key, fmt in rows if key in metrics]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value, fmt in rows:
        lines.append(f"{name:<{width}}  {'n/a' if value is None else fmt.format(value)}")
    return "\n".join(lines)


def published_line(samples: Path, metrics: dict) -> str | None:
    """When the samples' `.npz` records a preset (`fastdit sample-ddp --preset`): its published figure
    beside the measured one, with any setting the run changed from the preset."""
    from ..sample_ddp.npz import read_settings
    from ..sampling.presets import PRESETS

    if samples.suffix.lower() != ".npz":
        return None
    recipe = (read_settings(samples) or {}).get("recipe") or {}
    preset = PRESETS.get(recipe.get("preset"))
    if preset is None:
        return None
    figures = [f"{name.upper()} {metrics[name]:.2f} measured, {value:g} published" for name, value in preset.published.items()
               if metrics.get(name) is not None]
    changed = sorted(recipe.get("overridden") or {})
    note = f"; this run changed {', '.join(changed)}, so the figures need not agree" if changed else ""
    return f"preset {preset.name}: {'; '.join(figures) or 'no figure to compare'} ({preset.source}){note}"


def run(args: argparse.Namespace) -> int | None:
    from ..evaluate import (
        IS_SPLIT_SIZE,
        DinoV2FeatureExtractor,
        InceptionFeatureExtractor,
        compare,
        save_statistics,
        statistics_for_path,
    )
    from ..evaluate.sources import is_statistics_file
    from ..evaluate.statistics import check_metric_names, check_same_resolution
    from ..io import atomic_write_json
    from .common import check_output_file

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.pr_subset < 0:
        raise UserError(f"--pr-subset must be >= 0 (0 = all images), got {args.pr_subset}")
    pr_subset = args.pr_subset or None
    try:
        metrics_asked = check_metric_names(args.metrics.split(","))
    except UserError as err:
        raise UserError(f"--metrics {args.metrics!r}: {err}") from None
    with_dinov2 = "fd-dinov2" in metrics_asked
    from ..devices import resolve_device

    device = resolve_device(args.device)
    progress = not args.no_progress
    first, second = Path(args.samples).expanduser(), Path(args.ref).expanduser()

    # Check the inputs and outputs before loading the network and minutes of Inception, not after.
    if args.make_ref:
        if is_statistics_file(first):
            raise UserError(f"{str(first)!r} is already a statistics file; pass an image folder or .npz batch")
        _image_size(first, "samples", False)
        output = _check_make_ref_output(first, args.ref)
    else:
        sample_size = _image_size(first, "samples", with_dinov2)
        check_same_resolution(sample_size, _image_size(second, "reference", with_dinov2), str(second))
        if args.out_json:
            check_output_file(args.out_json, (".json",))
    needs_network = args.make_ref or not (is_statistics_file(first) and is_statistics_file(second))
    extractor = dinov2 = None
    if needs_network:
        if with_dinov2:  # first: an offline machine learns at once which file to fetch
            dinov2 = DinoV2FeatureExtractor(
                args.fd_dinov2_encoder, device=device, batch_size=args.batch_size, progress=progress
            )
        extractor = InceptionFeatureExtractor(
            args.inception_weights, device=device, batch_size=args.batch_size, progress=progress
        )

    if args.make_ref:
        stats = statistics_for_path(first, extractor, pr_subset=pr_subset, progress=progress, dinov2=dinov2)
        written = save_statistics(stats, output)
        height, width = stats.image_size
        extra = " with DINOv2 moments" if stats.has_dinov2 else ""
        print(f"wrote reference statistics{extra} of {stats.num_images} images ({height}x{width}) to {written}")
        return 0

    sample_stats = statistics_for_path(first, extractor, pr_subset=pr_subset, progress=progress, dinov2=dinov2)
    ref_stats = statistics_for_path(
        second, extractor, pr_subset=pr_subset, reference=True, progress=progress, dinov2=dinov2
    )
    metrics = compare(
        sample_stats, ref_stats, device=str(device), pr_distances=args.pr_distances, metrics=metrics_asked
    )
    print(f"samples:   {first} ({sample_stats.num_images} images)")
    print(f"reference: {second} ({ref_stats.num_images} images)")
    print(format_table(metrics))
    published = published_line(first, metrics)
    if published:
        print(published)
    if args.out_json:
        atomic_write_json(
            {
                **metrics,
                "samples": str(first),
                "reference": str(second),
                "pr_subset": pr_subset,
                "pr_distances": args.pr_distances,
                "inception_split_size": IS_SPLIT_SIZE,
                "metrics": list(metrics_asked),
                **({"fd_dinov2_encoder": args.fd_dinov2_encoder} if with_dinov2 else {}),
                "device": str(device),
                "published": published_line(first, metrics),
            },
            args.out_json,
        )
    return 0
