"""`fastdit train`: train a DiT on a latent store, an image folder or the digits, on 1…N processes."""

from __future__ import annotations

import argparse
import os
import shlex

from ..program import program_words
from ..train.config import SECTIONS, RunSection, TrainConfig, flat_fields
from .arg_types import positive_int
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
    # A flag not given leaves no attribute (SUPPRESS): `config_from_args` tells the flags given from the
    # defaults, so that over a --preset each flag given overrides one field and nothing else does.
    for action in parser._actions:
        if action.dest in flat_fields():
            action.default = argparse.SUPPRESS
    parser.add_argument("--dry-run", nargs="?", type=positive_int, const=0, default=None, metavar="PROCESSES",
                        help="print the memory each process needs for this run (estimated on the meta device: nothing "
                             "is allocated, trained or written) and stop; PROCESSES: for that many (default: this "
                             "job's, 1 without torchrun)")


def dry_run(config: TrainConfig, processes: int) -> int:
    """Print the memory estimate of `config` on `processes` processes (`fastdit.train.memory`)."""
    from ..train.memory import estimate_memory
    from ..train.training_data import model_input_shape

    config.validate()
    shape = model_input_shape(config)
    estimate = estimate_memory(config, processes, shape)
    sharding = "FSDP, sharded over them" if config.run.fsdp and processes > 1 else "each holding a whole copy"
    print(f"{config.model.name} on inputs {shape}, {processes} process(es) ({sharding}), global batch "
          f"{config.optimisation.global_batch_size}, {config.run.precision}, activation checkpointing "
          f"{config.run.gradient_checkpointing}; memory per process (an estimate):")
    print("\n".join(estimate.lines()))
    print("to lower it: --gradient-checkpointing (blocks, mlp, every-K), --micro-batch-size (gradient accumulation: "
          "the same steps), --precision bf16, or --fsdp over several GPUs")
    return 0


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the flags given over the fields' defaults, or over a --preset's fields."""
    given = {name: getattr(args, name) for name in flat_fields() if hasattr(args, name)}
    if given.get("preset") is not None:
        from ..train.presets import get_train_preset

        given = get_train_preset(given["preset"]).flags(given)
    return TrainConfig.create(**given)


def run(args: argparse.Namespace) -> int:
    from ..train.loop import train

    config = config_from_args(args)
    if getattr(args, "dry_run", None) is not None:
        return dry_run(config, args.dry_run or int(os.environ.get("WORLD_SIZE", "1")))
    result = train(config)
    # Under torchrun every process returns here: the closing line is the main process's (RANK 0) alone.
    if result.export is not None and int(os.environ.get("RANK", "0")) == 0:
        # The export records its sampling recipe (MeanFlow's: one step at cfg 1): no flag is needed.
        sample = shlex.join([*program_words(), "sample", "--ckpt", str(result.export)])
        print(f"done: step {result.step}, run folder {result.run_dir}; sample with: {sample}")
    return 0
