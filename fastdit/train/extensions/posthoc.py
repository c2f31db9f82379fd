"""`train --posthoc-ema`: two power-function EMAs tracked beside the model, with snapshots from which
`fastdit ema` makes the EMA of any length after training (EDM2, Karras et al. 2024, Sec. 3; the
averages and snapshots are `fastdit.train.posthoc_ema`, the reconstruction `fastdit.power_ema`).

Updated after every optimizer step that was taken, sharded like the model under FSDP, saved under
"posthoc_ema" in training checkpoints (a resumed run continues them bit-exactly); the snapshots are
written every `--posthoc-every` steps and at the end, before the step's checkpoint: a run resumed from
that checkpoint does not pass the step again, so its snapshots must already be there.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

from torch.distributed.checkpoint.state_dict import StateDictOptions

from ... import distributed
from ...errors import UserError
from ..options import option
from ..posthoc_ema import PowerEMAs, check_sigma_rel, prune_snapshots, save_snapshots, snapshot_folder
from .base import BuildContext, RunContext, TrainExtension, register_extension


@dataclass
class PosthocSettings:
    # EDM2 tracks σ_rel 0.05 and 0.10.
    posthoc_ema: bool = option(False, "also keep two power-function EMAs (EDM2) and store snapshots of them every "
                                      "--posthoc-every steps in the run folder; `fastdit ema` then makes the EMA of "
                                      "any length σ_rel from them")
    posthoc_sigma_rels: tuple[float, float] = option((0.05, 0.10), "the two EMA lengths σ_rel tracked "
                                                     "(std of the averaging profile / training time)")
    posthoc_every: int = option(5000, "steps between post-hoc EMA snapshots (and one at the end)", at_least=1,
                                resumable=True)
    # Every 5000 steps over DiT's 7M would be 1,400 pairs (7.6 TB for XL/2); EDM2 reconstructs from a few
    # hundred at most, spread evenly, and the smooth power profiles fit from fewer.
    posthoc_keep: int = option(64, "snapshot steps kept at most: past that the older ones are thinned evenly over "
                                   "the run (every other one goes), so the disk use stops growing", at_least=2,
                               resumable=True)

    def __post_init__(self):
        # JSON (config.json, checkpoints) gives the σ_rel pair back as a list
        if isinstance(self.posthoc_sigma_rels, list):
            self.posthoc_sigma_rels = tuple(self.posthoc_sigma_rels)


@register_extension
class PosthocEMA(TrainExtension):
    name: ClassVar[str] = "posthoc-ema"
    section: ClassVar[str] = "posthoc"
    settings: ClassVar[type] = PosthocSettings
    checkpoint_key: ClassVar[str] = "posthoc_ema"

    def __init__(self, averages: PowerEMAs, every: int, keep: int):
        self.averages, self.every, self.keep = averages, every, keep

    @classmethod
    def enabled(cls, config) -> bool:
        return config.posthoc.posthoc_ema

    @classmethod
    def validate(cls, config, architecture) -> None:
        sigma_rels = config.posthoc.posthoc_sigma_rels
        if not (isinstance(sigma_rels, tuple) and len(sigma_rels) == 2
                and all(isinstance(s, numbers.Real) and not isinstance(s, bool) for s in sigma_rels)):
            raise UserError(f"--posthoc-sigma-rels takes two numbers, got {sigma_rels!r}; e.g. 0.05 0.10")
        for sigma_rel in sigma_rels:
            check_sigma_rel(sigma_rel, "--posthoc-sigma-rels")
        if f"{sigma_rels[0]:g}" == f"{sigma_rels[1]:g}":
            raise UserError(f"--posthoc-sigma-rels needs two different lengths, got {sigma_rels[0]:g} twice; "
                            f"e.g. 0.05 0.10")

    @classmethod
    def build(cls, context: BuildContext) -> "PosthocEMA":
        settings = context.config.posthoc
        return cls(PowerEMAs(context.model, settings.posthoc_sigma_rels), settings.posthoc_every, settings.posthoc_keep)

    def shard(self, shard_like_model) -> None:
        if shard_like_model is not None:
            for average in self.averages.modules:
                shard_like_model(average)

    def describe(self) -> str:
        lengths = " and ".join(f"{s:g}" for s in self.averages.sigma_rels)
        return f"post-hoc EMAs σ_rel {lengths} (snapshots every {self.every} steps, {self.keep} kept at most)"

    def after_step(self, model, step, taken):
        self.averages.update(model, step + 1, taken)  # counted from 1: the first update copies the weights

    def at_step_end(self, run: RunContext, step: int, last: bool) -> None:
        if step % self.every and not last:
            return
        run.settle()  # a step that stops the run writes no snapshot
        # Gathered from every process under FSDP; rank 0 writes.
        states = self.averages.state_dict(StateDictOptions(full_state_dict=True, cpu_offload=True))
        if run.dist.is_main:
            paths = save_snapshots(run.run_dir, states, self.averages, step, run.model_info)
            removed = prune_snapshots(run.run_dir, step, self.every, self.keep)
            run.log.info(f"saved post-hoc EMA snapshots {', '.join(p.name for p in paths)}"
                         + (f"; thinned {len(removed)} older file(s) (--posthoc-keep {self.keep})" if removed else ""))
        distributed.barrier()

    def folders(self, run_dir):
        return [snapshot_folder(run_dir)]

    def state_dict(self, options):
        return self.averages.state_dict(options)

    def load_state_dict(self, state, options):
        # Only rank 0 holds them when they are broadcast from it: the others take part with empty ones.
        self.averages.load_state_dict(state if state is not None else [{}] * len(self.averages.modules), options)
