"""The training-extension protocol: a training method that sits beside the objective, in one module.

An objective says what the network is trained for (`fastdit.objectives`). An extension adds to how it
is trained, on top of any objective: an exponential moving average of the weights, representation
alignment (REPA), token routing (TREAD), post-hoc EMAs, a dispersive loss. The training step, the loop
and the checkpoints name none of them; each is a subclass of `TrainExtension` registered with
`register_extension`, and takes part through the hooks below. Every hook has a default that does
nothing, so an extension writes only the ones it needs.

Settings and life cycle
* `settings`: a dataclass of its settings (fields declared with `fastdit.train.options.option`), which
  becomes the config section `section` and one `fastdit train` flag per field.
* `enabled(config)`: whether a run with this config uses it; `validate(config, architecture)`: a
  UserError for settings that do not fit the run or the model (called whether enabled or not, so that a
  malformed value is an error even while the method is off).
* `build(context)`: the extension for a run (or None where it would change nothing), from the plain
  model right after it is built and initialised, before any wrapping (checkpointing, compile,
  DDP/FSDP), on the same seeded stream on every process; `shard(shard_like_model)` after the wrapping:
  under FSDP a function that shards a copy of the model as the model is (averages of the weights use it),
  else None.
* `describe()`: its part of the run's start-up line ("" says nothing).

Inside a step (`fastdit.train.step.train_step`), in this order
* `draw(generator, device)`: its random draws for one sample, from the sample's own generator after the
  objective's and the step's own draws (so a run without it draws exactly what it drew before);
* `training_inputs(micro)`: model inputs for the trained forward only (token routing's kept tokens);
  passes that compute targets under stop-gradient do not get them (`TrainingNetwork.target`);
* `capture(model)`: a context manager around the objective's loss, e.g. a hook that keeps a block's
  output tokens; what it yields is handed to `loss_terms(micro, captured)`, which returns named
  per-sample `Term`s: each is logged by name and added to "loss" with its weight;
* `parameters()` and `optimizer`: parameters trained beside the model, with their own optimizer (the
  step sets its learning rate, clips them with the model by their joint norm, and steps it);
  `after_backward()`: after the last micro-batch's backward (a replicated module averages its gradients);
* `after_step(model, step, taken)`: after the optimizer step; `taken` is a scalar tensor on the device,
  1 when the step updated and 0 when it was skipped (not finite): an update scales by it, so that a
  skipped step changes nothing and the host need not wait for the decision.

Around the steps
* `at_step_end(run, step, last)`: after each step, before the step's checkpoint (snapshots); one that
  acts on the step calls `run.settle()` first;
* `folders(run_dir)`: folders of the run it writes into (stale temporary files are removed there);
* `checkpoint_key`, `state_dict(options)`, `load_state_dict(state, options)`: what it adds to a training
  checkpoint under its key, restored on resume bit for bit. Under FSDP `state_dict` is called on every
  process (a sharded state is gathered; only rank 0 gets the tensors). On a resume of several processes
  only rank 0 reads the checkpoint (`options.broadcast_from_rank0`): the others get None and the state
  must reach them (`set_model_state_dict` broadcasts with those options; `broadcast_from_rank0` for
  anything else).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

if TYPE_CHECKING:
    from ...distributed import DistInfo
    from ...model_info import ModelInfo
    from ..step_noise import StepDraws


@dataclass(frozen=True)
class Term:
    """A loss term of an extension: per-sample `value` (N,), added to "loss" times `weight`."""

    value: torch.Tensor
    weight: float


@dataclass(frozen=True)
class BuildContext:
    """What `TrainExtension.build` sees: the run's config, the plain model (built and initialised, not
    yet wrapped), the process, and the optimizer every trained module uses (AdamW with the run's
    settings, `fastdit.train.loop.make_optimizer`)."""

    config: Any  # TrainConfig
    model: torch.nn.Module
    dist: DistInfo
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]


@dataclass
class MicroBatch:
    """One micro-batch of a step, as the hooks see it: clean inputs `x` (latents or pixels), the clean
    `images` they were made from (when an extension `needs_images`: a store's kept images, or `x` itself
    in pixel space), `labels`, the micro-batch's `draws`, and the `training_inputs` gathered so far."""

    x: torch.Tensor
    images: torch.Tensor | None
    labels: torch.Tensor
    draws: StepDraws
    training_inputs: dict = field(default_factory=dict)

    def tokens_seen_by(self, block: int) -> torch.Tensor | None:
        """The token indices (N, K) that block `block` (0-based) runs on in the trained forward, or None
        when it sees every token: a training input that sends a subset of tokens through a span of
        blocks says so with a `kept_at(block)` method (`fastdit.models.routing.TokenRoute`)."""
        for value in self.training_inputs.values():
            kept_at = getattr(value, "kept_at", None)
            if kept_at is not None:
                kept = kept_at(block)
                if kept is not None:
                    return kept
        return None


@dataclass(frozen=True)
class RunContext:
    """What `TrainExtension.at_step_end` sees of the run: its folder, the process, the model's record
    (for exports), the logger, and `settle()`: an extension that acts on a step calls it first (the
    loop reads a step's outcome one step late; this reads it now, and stops the run if it must)."""

    run_dir: Path
    dist: DistInfo
    model_info: ModelInfo
    log: Any  # RunLogger
    settle: Callable[[], None] = lambda: None


class TrainExtension:
    """The base of every training extension (module docstring); instances are built by `build`."""

    name: ClassVar[str]  # the registry's key, e.g. "repa"
    section: ClassVar[str]  # the config section of its settings, e.g. "alignment"
    settings: ClassVar[type]  # a dataclass of `option` fields
    needs_images: ClassVar[bool] = False  # the step must hand it the clean images (`MicroBatch.images`)
    checkpoint_key: ClassVar[str | None] = None  # its entry in training checkpoints; None: it has no state
    optimizer: torch.optim.Optimizer | None = None  # for `parameters()`, when it trains any

    # ------------------------------------------------------------------------------------------
    # settings and life cycle
    # ------------------------------------------------------------------------------------------

    @classmethod
    def enabled(cls, config) -> bool:
        raise NotImplementedError(f"{cls.__name__} must say when it is enabled")

    @classmethod
    def validate(cls, config, architecture) -> None:
        """A UserError for settings that do not fit `config` or the model `architecture` (a DiTConfig)."""

    @classmethod
    def build(cls, context: BuildContext) -> "TrainExtension | None":
        """The extension for this run; None when, for this model, it would change nothing."""
        raise NotImplementedError(f"{cls.__name__} must build itself")

    def shard(self, shard_like_model: Callable[[torch.nn.Module], None] | None) -> None:
        """After the model is wrapped: under FSDP2 `shard_like_model(module)` shards a module shaped like the
        model as the model is (same mesh, float32 weights); None without FSDP."""

    def describe(self) -> str:
        return ""

    # ------------------------------------------------------------------------------------------
    # a step
    # ------------------------------------------------------------------------------------------

    def draw(self, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    def training_inputs(self, micro: MicroBatch) -> dict:
        return {}

    def capture(self, model: torch.nn.Module):
        return contextlib.nullcontext()

    def loss_terms(self, micro: MicroBatch, captured) -> dict[str, Term]:
        return {}

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def after_backward(self) -> None:
        pass

    def after_step(self, model: torch.nn.Module, step: int, taken: torch.Tensor) -> None:
        """After optimizer step `step` (counted from 0, as the step's draws count it); `taken` (0-d, on the
        device) is 1 if the step updated the model, 0 if it was skipped."""

    # ------------------------------------------------------------------------------------------
    # around the steps
    # ------------------------------------------------------------------------------------------

    def at_step_end(self, run: RunContext, step: int, last: bool) -> None:
        """After step `step` (counted from 1) of the run, before its checkpoint; `last`: the run's last."""

    def folders(self, run_dir: Path) -> list[Path]:
        return []

    def state_dict(self, options) -> Any:
        return None

    def load_state_dict(self, state, options) -> None:
        pass


def broadcast_from_rank0(state, options):
    """`state` as rank 0 holds it, on every process, when `options` say that only rank 0 read the
    checkpoint (pickled: for small states; module weights go through `set_model_state_dict`)."""
    if not getattr(options, "broadcast_from_rank0", False):
        return state
    import torch.distributed as torch_dist

    message = [state]
    torch_dist.broadcast_object_list(message, src=0)
    return message[0]


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

EXTENSIONS: dict[str, type[TrainExtension]] = {}
# Sections of the training config that are not extensions' (`fastdit.train.config`).
CORE_SECTIONS = ("model", "objective", "optimisation", "data", "run", "evaluation", "recipe")


def register_extension(cls: type[TrainExtension]) -> type[TrainExtension]:
    """Add an extension class under its `name` (a class decorator). Its settings become a config
    section and flags, so their names must be new: no other section may have a field of that name."""
    if not (isinstance(getattr(cls, "name", None), str) and cls.name):
        raise ValueError(f"{cls.__name__} needs a name")
    if cls.name in EXTENSIONS:
        raise ValueError(f"a training extension named {cls.name!r} is registered already")
    if cls.section in CORE_SECTIONS or any(other.section == cls.section for other in EXTENSIONS.values()):
        raise ValueError(f"{cls.__name__}'s section {cls.section!r} is taken")
    if not dataclasses.is_dataclass(cls.settings):
        raise ValueError(f"{cls.__name__}.settings must be a dataclass of `option` fields")
    taken = {f.name for other in EXTENSIONS.values() for f in dataclasses.fields(other.settings)}
    for f in dataclasses.fields(cls.settings):
        if "help" not in f.metadata:
            raise ValueError(f"{cls.__name__}.settings.{f.name} needs a help text (declare it with `option`)")
        if f.name in taken:
            raise ValueError(f"{cls.__name__}.settings.{f.name} is another extension's setting already")
    EXTENSIONS[cls.name] = cls
    return cls


def enabled_extensions(config) -> list[type[TrainExtension]]:
    """The extension classes a run with `config` uses, in registration order (the order of their hooks)."""
    return [cls for cls in EXTENSIONS.values() if cls.enabled(config)]


def build_extensions(context: BuildContext) -> list[TrainExtension]:
    built = [cls.build(context) for cls in enabled_extensions(context.config)]
    return [extension for extension in built if extension is not None]
