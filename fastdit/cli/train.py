"""`fastdit train`: train a DiT on a latent store, an image folder or the digits, on 1…N processes."""

from __future__ import annotations

import argparse
import os
import shlex

from ..program import program_words
from ..train.config import SECTIONS, RunSection, TrainConfig, flat_fields
from .dataclass_args import add_dataclass_arguments

HELP = "train a DiT (one process, or torchrun / accelerate launch for many GPUs and nodes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = {section: parser.add_argument_group(section) for section in SECTIONS}
    for section, cls in SECTIONS.items():
        add_dataclass_arguments(groups[section], cls)
    # --gradient-checkpointing takes a policy; the flag alone means every block (its `flag_alone`), as when
    # it was an on/off switch, which its old spellings still are.
    groups["run"].add_argument("--grad-checkpointing", dest="gradient_checkpointing", nargs="?", const="blocks",
                               default=RunSection.gradient_checkpointing, metavar="POLICY", help=argparse.SUPPRESS)
    groups["run"].add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const",
                               const="off", help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.create(**{name: getattr(args, name) for name in flat_fields() if hasattr(args, name)})


def run(args: argparse.Namespace) -> int:
    from ..train.loop import train

    config = config_from_args(args)
    result = train(config)
    # Under torchrun every process returns here: the closing line is the main process's (RANK 0) alone.
    if result.export is not None and int(os.environ.get("RANK", "0")) == 0:
        # The export records its sampling recipe (MeanFlow's: one step at cfg 1): no flag is needed.
        sample = shlex.join([*program_words(), "sample", "--ckpt", str(result.export)])
        print(f"done: step {result.step}, run folder {result.run_dir}; sample with: {sample}")
    return 0
