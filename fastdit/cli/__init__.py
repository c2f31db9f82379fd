"""The `fastdit` command line: one subcommand per job, each in its own module.

A subcommand module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int | None`;
every subcommand takes `--threads` (`fastdit.cpu_threads`: by default a job takes the cores other
processes leave free; a module with `MEASURES_THE_MACHINE = True`, the benchmarks, keeps torch's count
unless told).
All parsing and user errors live at this edge: a `UserError` raised anywhere below is printed as one
line (`fastdit sample: error: ...`) with exit status 2, never as a traceback. An `OptionError` (a
sampling option's value) is worded with the flags of a subcommand that has them (its `_option_flags`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..cpu_threads import configure_threads
from ..errors import OptionError, UserError, flag_namer
from ..host_memory import keep_freed_host_memory
from .arg_types import positive_int

# subcommand name -> module under fastdit.cli
SUBCOMMANDS = {
    "sample": "sample",
    "extract": "extract",
    "train": "train",
    "ema": "ema",
    "demo": "demo",
    "sample-ddp": "sample_ddp",
    "evaluate": "evaluate",
    "sweep": "sweep",
    "presets": "presets",
    "app": "app",
    "bench": "bench",
}


def _load(module_name: str):
    try:
        return importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{module_name}":
            return None  # not built yet
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdit",
        description="Diffusion Transformers (DiT): sample, train, and evaluate.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.add_argument("--threads", type=positive_int, default=None,
                         help="PyTorch CPU threads (default: the cores other processes leave free, at least 1; "
                              "OMP_NUM_THREADS is respected)")
        sub.set_defaults(_module=module, _parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    keep_freed_host_memory()  # every job repeats steps that free and take back the same memory
    try:
        if args.threads is not None or not getattr(args._module, "MEASURES_THE_MACHINE", False):
            configure_threads(args.threads)
        status = args._module.run(args)
    except UserError as err:
        flags = getattr(args, "_option_flags", None)  # a subcommand with sampling flags names them
        words = err.at_edge(flag_namer(flags)) if isinstance(err, OptionError) and flags else str(err)
        message = f"fastdit {args.command}: error: {words}\n"
        from .. import distributed

        if distributed.in_multiprocess_job():
            distributed.leave_job_now(2, message)
        args._parser.exit(2, message)
    except KeyboardInterrupt:
        print(f"fastdit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)
