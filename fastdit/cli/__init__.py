"""The `fastdit` command line: one subcommand per job, each in its own module.

A subcommand module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int | None`;
every subcommand that runs torch takes `--threads` (`fastdit.cpu_threads`: by default a job takes the
cores other processes leave free; a module with `MEASURES_THE_MACHINE = True`, the benchmarks, keeps
torch's count unless told; one with `USES_TORCH = False`, `presets`, has no --threads).
`fastdit --help` and `fastdit --version` import no subcommand (and so no torch): the one-line helps are
read from the modules' source; a subcommand's module is imported when it is the one asked for.
All parsing and user errors live at this edge: a `UserError` raised anywhere below is printed as one
line (`fastdit sample: error: ...`) with exit status 2, never as a traceback. An `OptionError` (a
sampling option's value) is worded with the flags of a subcommand that has them (its `_option_flags`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys

from .. import __version__
from ..errors import ArgumentError, OptionError, UserError, flag_namer
from .arg_types import positive_int

# The flags of the loading functions' arguments that an `ArgumentError` names (`fastdit.loading`): the
# checkpoint's path is `source` in Python; --vae has the argument's name.
ARGUMENT_FLAGS = {"source": "--ckpt"}
# subcommand name -> module under fastdit.cli
SUBCOMMANDS = {
    "sample": "sample",
    "extract": "extract",
    "train": "train",
    "train-decoder": "train_decoder",
    "ema": "ema",
    "demo": "demo",
    "sample-ddp": "sample_ddp",
    "evaluate": "evaluate",
    "sweep": "sweep",
    "presets": "presets",
    "app": "app",
    "bench": "bench",
}


def _help_of(module_name: str) -> str:
    """A subcommand's one-line `HELP`, read from its module's source without importing it (the modules
    import torch; `fastdit --help` should not wait for it). A HELP that is no literal imports the module."""
    spec = importlib.util.find_spec(f"{__name__}.{module_name}")
    if spec is not None and spec.origin:
        with open(spec.origin, encoding="utf-8") as source:
            for node in ast.parse(source.read()).body:
                if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HELP" for t in node.targets):
                    try:
                        return ast.literal_eval(node.value)
                    except ValueError:
                        break
    return _load(module_name).HELP


def _load(module_name: str):
    try:
        return importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{module_name}":
            return None  # not built yet
        raise


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The command line; `commands` names the subcommands whose flags it holds (their modules are
    imported), by default every one. The others are listed with their help line only."""
    parser = argparse.ArgumentParser(
        prog="fastdit",
        description="Diffusion Transformers (DiT): sample, train, and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"fastdit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if commands is not None and name not in commands:
            text = _help_of(module_name)
            subparsers.add_parser(name, help=text, description=text)
            continue
        module = _load(module_name)
        if module is None:
            continue
        # A module's EPILOG (examples, laid out by hand) follows the flags as written.
        epilog = getattr(module, "EPILOG", None)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP, epilog=epilog,
                                    formatter_class=argparse.RawDescriptionHelpFormatter if epilog else
                                    argparse.HelpFormatter)
        module.add_arguments(sub)
        if getattr(module, "USES_TORCH", True):
            sub.add_argument("--threads", type=positive_int, default=None,
                             help="PyTorch CPU threads (default: the cores other processes leave free, at least 1; "
                                  "OMP_NUM_THREADS is respected)")
        say_defaults_and_choices(sub)
        sub.set_defaults(_module=module, _parser=sub)
    return parser


def say_defaults_and_choices(parser: argparse.ArgumentParser) -> None:
    """Every flag's help says its default and its choices, once, whoever wrote the flag: a help text that
    does not mention its default gets "(default: X)", one whose choices a metavar hides gets them listed
    (tests/test_cli_help.py reads every subcommand's help)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                say_defaults_and_choices(sub)
            continue
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        if action.choices is not None and action.metavar is not None:
            missing = [str(c) for c in action.choices if str(c) not in action.help]
            if missing:
                action.help += f" (one of: {', '.join(map(str, action.choices))})"
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction))
        if not switch and action.default not in (None, argparse.SUPPRESS) and "default" not in action.help:
            default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
            action.help += f" (default: {default})"


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else [str(word) for word in argv]
    # Only the subcommand asked for is loaded (the first word; the top level has no flag that takes a value).
    parser = build_parser([words[0]] if words and words[0] in SUBCOMMANDS else [])
    args = parser.parse_args(words)
    if args.command is None:
        parser.print_help()
        return 2
    from ..cpu_threads import configure_threads
    from ..host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # every job repeats steps that free and take back the same memory
    try:
        threads = getattr(args, "threads", None)
        uses_torch = getattr(args._module, "USES_TORCH", True)
        if uses_torch and (threads is not None or not getattr(args._module, "MEASURES_THE_MACHINE", False)):
            configure_threads(threads)
        status = args._module.run(args)
    except UserError as err:
        flags = getattr(args, "_option_flags", None)  # a subcommand with sampling flags names them
        if isinstance(err, ArgumentError):  # advice about the loading functions' arguments: their flags
            words = err.at_edge(flag_namer({**ARGUMENT_FLAGS, **(flags or {})}))
        else:
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
