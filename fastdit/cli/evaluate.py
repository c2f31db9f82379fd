"""`fastdit evaluate SAMPLES REF`: FID, sFID, Inception Score, precision and recall, as ADM defines them;
FD-DINOv2 (Stein et al. 2023), MIND (arXiv:2605.06797), CMMD (Jayasumana et al. 2024) and FDr6
(arXiv:2604.28190), each as its authors define it (`--metrics fid,sfid,is,pr,fd-dinov2,mind,cmmd,fdr6`).

SAMPLES and REF are each an ADM `.npz` batch (uint8 `arr_0`, N x H x W x 3; precomputed `mu`,
`sigma`, `mu_s`, `sigma_s` are used when present), an image folder, a statistics file written by
`fastdit evaluate --make-ref SOURCE OUT.npz` (which also stores what the encoder metrics named in
`--metrics` need), or, as REF, an `.npz` of FID moments only (torch-fidelity's / JiT's `mu`, `sigma`).
`--reference-pipeline` names the ADM evaluator's way (default) or JiT's (`fastdit.evaluate.statistics`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UserError
from ..evaluate.cmmd import CMMD_ENCODER
from ..evaluate.dinov2 import FD_DINOV2_ENCODER
from ..evaluate.fdr import ENCODER_SPACES
from ..evaluate.metrics import PR_DISTANCES
from ..evaluate.mind import MIND_PROJECTIONS
from ..evaluate.statistics import METRICS, PIPELINE_METRICS, REFERENCE_PIPELINES

HELP = (
    "FID, sFID, Inception Score, precision and recall of samples against a reference (ADM evaluator "
    "definitions), and FD-DINOv2, MIND, CMMD, FDr6"
)
# What --make-ref stores and a statistics file must carry for each metric besides the ADM ones.
STORED = {"fd-dinov2": "DINOv2 moments", "cmmd": "CLIP embeddings", "fdr6": "FDr6 moments"}


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
        default=None,
        metavar="LIST",
        help=f"comma-separated metrics among {','.join(METRICS)} (default: the pipeline's, "
        f"{','.join(PIPELINE_METRICS['adm'])} for adm, {','.join(PIPELINE_METRICS['jit'])} for jit); "
        "fd-dinov2: Frechet distance on DINOv2 ViT-L/14 (Stein et al. 2023); mind: sliced Wasserstein on "
        "Inception pool_3 (arXiv 2605.06797); cmmd: MMD on CLIP ViT-L/14@336 (Jayasumana et al. 2024); "
        "fdr6: normalised Frechet distance in six spaces (arXiv 2604.28190); with --make-ref, what they "
        "need is stored in the reference file too",
    )
    parser.add_argument(
        "--reference-pipeline",
        choices=REFERENCE_PIPELINES,
        default="adm",
        help="adm (default): the ADM evaluator's reference batch and IS splits (DiT, SiT, REPA numbers); jit: "
        "FID against a file of FID moments (JiT's jit_in256_stats.npz) and torch-fidelity's IS splits "
        "(JiT, MAR, iMF numbers). Same network, other reference: the two FIDs differ",
    )
    parser.add_argument(
        "--fd-dinov2-encoder",
        default=FD_DINOV2_ENCODER,
        metavar="SPEC",
        help=f"the encoder for fd-dinov2 (default {FD_DINOV2_ENCODER}, downloaded once into the fastdit cache); "
        f"{FD_DINOV2_ENCODER}=FOLDER for a local copy (config.json + model.safetensors), or a TorchScript file",
    )
    parser.add_argument(
        "--cmmd-encoder",
        default=CMMD_ENCODER,
        metavar="SPEC",
        help=f"the encoder for cmmd (default {CMMD_ENCODER}: CLIP ViT-L/14 at 336 px); {CMMD_ENCODER}=FOLDER "
        "for a local copy",
    )
    parser.add_argument(
        "--fdr6-encoder",
        action="append",
        default=[],
        metavar="SPACE:SPEC",
        help="another encoder for one FDr6 space ("
        + ", ".join(f"{space.name}:{space.encoder}" for space in ENCODER_SPACES)
        + " by default), e.g. dinov2:dinov2-vitl14=/data/dinov2-large for a local copy; repeatable",
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
        help="images per forward pass of Inception and of the other encoders (default 64); the features "
        "do not depend on it beyond float rounding",
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


def _image_size(path, role: str, metrics) -> tuple[int, int] | None:
    """The resolution of a statistics file, `.npz` or folder, read without running a network; a file
    of statistics must carry what each asked-for metric needs."""
    from ..evaluate import load_statistics
    from ..evaluate.sources import is_statistics_file, open_images, read_fid_moments
    from ..evaluate.statistics import EvalStatistics

    moments = read_fid_moments(path)
    if moments is not None:
        stats = EvalStatistics(mu=moments["mu"], sigma=moments["sigma"], mu_s=moments.get("mu_s"),
                               sigma_s=moments.get("sigma_s"), num_images=0, source=str(path))
    elif is_statistics_file(path):
        stats = load_statistics(path)
    else:
        return open_images(path).image_size
    for metric in metrics:
        if metric in ("sfid", "fd-dinov2", "mind", "cmmd", "fdr6"):
            stats.require(metric, role)
    return stats.image_size


def _fdr6_encoders(values: list[str]) -> dict[str, str]:
    names = [space.name for space in ENCODER_SPACES]
    encoders = {}
    for value in values:
        space, colon, spec = value.partition(":")
        if not colon or space.strip() not in names or not spec.strip():
            raise UserError(f"--fdr6-encoder {value!r}: expected SPACE:SPEC with SPACE one of {', '.join(names)}")
        encoders[space.strip()] = spec.strip()
    return encoders


def format_table(metrics: dict) -> str:
    """One row per metric in `metrics` (as `compare` returns them); n/a where a value is None."""
    rows = [
        ("Inception Score", "inception_score", "{:.2f}"),
        ("FID", "fid", "{:.4f}"),
        ("sFID", "sfid", "{:.4f}"),
        ("Precision", "precision", "{:.4f}"),
        ("Recall", "recall", "{:.4f}"),
        ("FD-DINOv2", "fd_dinov2", "{:.4f}"),
        ("MIND", "mind", "{:.4f}"),
        ("CMMD", "cmmd", "{:.4f}"),
        ("FDr6", "fdr6", "{:.4f}"),
    ]
    rows = [(name, metrics[key], fmt) for name, key, fmt in rows if key in metrics]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value, fmt in rows:
        lines.append(f"{name:<{width}}  {'n/a' if value is None else fmt.format(value)}")
    return "\n".join(lines)


_NO_RECORD = object()


def recorded_preset(samples: Path):
    """(preset, the fields the run changed) that the samples' `.npz` records (`fastdit sample-ddp
    --preset`), or None. Read before the feature pass: a record that does not parse (an edited or foreign
    entry) is named in a warning and left out, rather than ending the evaluation after minutes of features."""
    import sys

    from ..sample_ddp.npz import read_settings
    from ..sampling.presets import PRESETS

    if samples.suffix.lower() != ".npz":
        return None
    settings = read_settings(samples) or {}
    recipe = settings.get("recipe") or {}
    name = recipe.get("preset") if isinstance(recipe, dict) else None
    overridden = recipe.get("overridden") or {} if isinstance(recipe, dict) else {}
    problem = ("its recipe is not an object" if not isinstance(recipe, dict)
               else "its preset is not a name" if name is not None and not isinstance(name, str)
               else "its overridden settings are not an object" if not isinstance(overridden, dict)
               else "")
    if problem:
        print(f"warning: {str(samples)!r} records fastdit settings that do not parse ({problem}); its preset is not "
              f"compared with published figures", file=sys.stderr)
        return None
    preset = PRESETS.get(name) if name is not None else None
    return None if preset is None else (preset, sorted(str(key) for key in overridden))


def published_line(samples: Path, metrics: dict, recorded=_NO_RECORD) -> str | None:
    """When the samples' `.npz` records a preset (`fastdit sample-ddp --preset`): its published figure
    beside the measured one, with any setting the run changed from the preset (`recorded`: what
    `recorded_preset(samples)` returned, read before the features)."""
    recorded = recorded_preset(samples) if recorded is _NO_RECORD else recorded
    if recorded is None:
        return None
    preset, changed = recorded
    figures = [f"{name.upper()} {metrics[name]:.2f} measured, {value:g} published" for name, value in preset.published.items()
               if metrics.get(name) is not None]
    note = f"; this run changed {', '.join(changed)}, so the figures need not agree" if changed else ""
    return f"preset {preset.name}: {'; '.join(figures) or 'no figure to compare'} ({preset.source}){note}"


def run(args: argparse.Namespace) -> int | None:
    from ..evaluate import (
        IS_SPLIT_SIZE,
        CMMDFeatureExtractor,
        DinoV2FeatureExtractor,
        FDRFeatureExtractors,
        InceptionFeatureExtractor,
        compare,
        save_statistics,
        statistics_for_path,
    )
    from ..evaluate.sources import is_statistics_file, read_fid_moments, reference_crop_side
    from ..evaluate.statistics import check_metric_names, check_same_resolution
    from ..io import atomic_write_json
    from .common import check_output_file

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.pr_subset < 0:
        raise UserError(f"--pr-subset must be >= 0 (0 = all images), got {args.pr_subset}")
    pr_subset = args.pr_subset or None
    metrics_text = args.metrics if args.metrics is not None else ",".join(PIPELINE_METRICS[args.reference_pipeline])
    try:
        metrics_asked = check_metric_names(metrics_text.split(","))
    except UserError as err:
        raise UserError(f"--metrics {metrics_text!r}: {err}") from None
    fdr6_encoders = _fdr6_encoders(args.fdr6_encoder)
    from ..devices import resolve_device

    device = resolve_device(args.device)
    progress = not args.no_progress
    first, second = Path(args.samples).expanduser(), Path(args.ref).expanduser()

    # Check the inputs and outputs before loading the networks and minutes of features, not after.
    reference_crop = None
    if args.make_ref:
        if is_statistics_file(first) or read_fid_moments(first) is not None:
            raise UserError(f"{str(first)!r} is already a statistics file; pass an image folder or .npz batch")
        _image_size(first, "samples", ())
        output = _check_make_ref_output(first, args.ref)
    else:
        sample_size = _image_size(first, "samples", metrics_asked)
        reference_crop = reference_crop_side(second, sample_size)
        if reference_crop is None:
            check_same_resolution(sample_size, _image_size(second, "reference", metrics_asked), str(second))
        if args.out_json:
            check_output_file(args.out_json, (".json",))
        recorded = recorded_preset(first)  # what the samples record, read now: the features take minutes

    def stored(path: Path) -> bool:
        return is_statistics_file(path) or read_fid_moments(path) is not None

    needs_network = args.make_ref or not (stored(first) and stored(second))
    extractor = dinov2 = cmmd = fdr = None
    if needs_network:
        # The encoders first: an offline machine learns at once which files to fetch.
        if "fd-dinov2" in metrics_asked:
            dinov2 = DinoV2FeatureExtractor(
                args.fd_dinov2_encoder, device=device, batch_size=args.batch_size, progress=progress
            )
        if "cmmd" in metrics_asked:
            cmmd = CMMDFeatureExtractor(args.cmmd_encoder, device=device, batch_size=args.batch_size,
                                        progress=progress)
        if "fdr6" in metrics_asked:
            fdr = FDRFeatureExtractors(fdr6_encoders, device=device, batch_size=args.batch_size, progress=progress)
        extractor = InceptionFeatureExtractor(
            args.inception_weights, device=device, batch_size=args.batch_size, progress=progress
        )
    encoders = dict(dinov2=dinov2, cmmd=cmmd, fdr=fdr, pipeline=args.reference_pipeline)

    if args.make_ref:
        stats = statistics_for_path(first, extractor, pr_subset=pr_subset, progress=progress, **encoders)
        written = save_statistics(stats, output)
        height, width = stats.image_size
        extras = [text for metric, text in STORED.items() if stats.has(metric)]
        extra = f" with {', '.join(extras)}" if extras else ""
        print(f"wrote reference statistics{extra} of {stats.num_images} images ({height}x{width}) to {written}")
        return 0

    sample_stats = statistics_for_path(first, extractor, pr_subset=pr_subset, progress=progress, **encoders)
    ref_stats = statistics_for_path(
        second, extractor, pr_subset=pr_subset, reference=True, progress=progress, crop_to=reference_crop, **encoders
    )
    metrics = compare(
        sample_stats, ref_stats, device=str(device), pr_distances=args.pr_distances, metrics=metrics_asked
    )
    print(f"samples:   {first} ({sample_stats.num_images} images)")
    print(f"reference: {second} ({ref_stats.num_images or 'moments of'} images)")
    print(format_table(metrics))
    published = published_line(first, metrics, recorded)
    if published:
        print(published)
    if args.out_json:
        atomic_write_json(
            {
                **metrics,
                "samples": str(first),
                "reference": str(second),
                "reference_pipeline": args.reference_pipeline,
                "pr_subset": pr_subset,
                "pr_distances": args.pr_distances,
                "inception_split_size": IS_SPLIT_SIZE if args.reference_pipeline == "adm" else None,
                "metrics": list(metrics_asked),
                **({"fd_dinov2_encoder": args.fd_dinov2_encoder} if "fd-dinov2" in metrics_asked else {}),
                **({"mind_projections": MIND_PROJECTIONS} if "mind" in metrics_asked else {}),
                **({"cmmd_encoder": args.cmmd_encoder} if "cmmd" in metrics_asked else {}),
                **({"fdr6_encoders": {space.name: fdr6_encoders.get(space.name, space.encoder)
                                      for space in ENCODER_SPACES}} if "fdr6" in metrics_asked else {}),
                "device": str(device),
                "published": published,
            },
            args.out_json,
        )
    return 0
