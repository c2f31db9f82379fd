"""`fastdit train`: train a DiT on a latent store, an image folder or the digits, on 1…N processes."""

from __future__ import annotations

import argparse
import shlex

from ..program import program_words
from ..train.config import SECTIONS, RoutingSection, RunSection, TrainConfig, flat_fields
from ..train.routing import PAPER_RATE
from .arg_types import finite_float
from .dataclass_args import add_dataclass_arguments

HELP = "train a DiT (one process, or torchrun / accelerate launch for many GPUs and nodes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = {section: parser.add_argument_group(section) for section in SECTIONS}
    for section, cls in SECTIONS.items():
        add_dataclass_arguments(groups[section], cls, skip=("gradient_checkpointing", "route"))
    # A policy string; the flag alone still means every block, as when it was an on/off switch.
    checkpointing = RunSection.__dataclass_fields__["gradient_checkpointing"]
    groups["run"].add_argument("--gradient-checkpointing", "--grad-checkpointing", nargs="?", const="blocks",
                        default=checkpointing.default, metavar="POLICY",
                        help=f"{checkpointing.metadata['help']} (default: {checkpointing.default})")
    # A rate; the flag alone routes at the paper's rate.
    route = RoutingSection.__dataclass_fields__["route"]
    groups["routing"].add_argument("--route", nargs="?", type=finite_float, const=PAPER_RATE, default=route.default,
                                   metavar="RATE", help=f"{route.metadata['help']} (default: {route.default})")
    groups["run"].add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const",
                        const="off", help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.create(**{name: getattr(args, name) for name in flat_fields() if hasattr(args, name)})


def run(args: argparse.Namespace) -> int:
    from ..train.loop import train

    config = config_from_args(args)
    result = train(config)
    if result.export is not None:
        # The export records its sampling recipe (MeanFlow's: one step at cfg 1): no flag is needed.
        sample = shlex.join([*program_words(), "sample", "--ckpt", str(result.export)])
        print(f"done: step {result.step}, run folder {result.run_dir}; sample with: {sample}")
    return 0
