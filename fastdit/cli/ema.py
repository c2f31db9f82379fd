"""`fastdit ema`: the EMA of any length from a `train --posthoc-ema` run's snapshots (EDM2 post-hoc EMA)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..train.posthoc_reconstruct import MAX_FIT_ERROR
from .arg_types import finite_float

HELP = "make the EMA of any length (--sigma-rel) from the snapshots a `train --posthoc-ema` run stored"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="the run folder `fastdit train` wrote")
    parser.add_argument("--sigma-rel", type=finite_float, required=True, metavar="S",
                        help="EMA length: std of the averaging profile over the training time (EDM2; "
                             "0.05-0.15 are typical, the two tracked lengths are stored exactly)")
    parser.add_argument("--step", type=int, default=None, metavar="N",
                        help="the training step to average up to (default: the last snapshot's)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="export to write (default: DIR/checkpoints/NNNNNNN-ema-sigmaS.safetensors); never a "
                             "file of the run, nor any existing file but an earlier `fastdit ema` export")
    parser.add_argument("--max-fit-error", type=finite_float, default=MAX_FIT_ERROR, metavar="E",
                        help=f"refuse an export whose profile fit error exceeds E (default {MAX_FIT_ERROR:g}): "
                             "the snapshots cannot form that EMA well (a step between snapshots, or a length far "
                             "from the tracked ones); up to 1 writes it anyway")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import export_weights
    from ..model_info import ModelInfo
    from ..program import program_words
    from ..train.posthoc_reconstruct import RECONSTRUCTION_KEY, check_output, default_output, reconstruct_ema
    from .common import check_output_file

    if args.out is not None:  # checked before the snapshots are read
        check_output(args.run, check_output_file(args.out, (".safetensors",)))
    result = reconstruct_ema(args.run, args.sigma_rel, args.step, max_fit_error=args.max_fit_error)
    out = Path(args.out) if args.out is not None else default_output(Path(args.run), result.step, args.sigma_rel)
    check_output(args.run, out)
    info = ModelInfo.from_dict(result.model_info, source=str(out))
    export_weights(result.weights, info, out, extra={RECONSTRUCTION_KEY: result.record})
    stored = sorted({s.sigma_rel for s in result.snapshots})
    print(f"wrote {out}: EMA σ_rel {args.sigma_rel:g} (γ {result.gamma:.3f}) at step {result.step}, from "
          f"{len(result.snapshots)} snapshots of σ_rel {' and '.join(f'{s:g}' for s in stored)}; profile fit error "
          f"{result.fit.relative_error:.2%}")
    print(f"sample with: {shlex.join([*program_words(), 'sample', '--ckpt', str(out)])}")
    return 0
