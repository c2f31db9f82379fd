"""The training run's configuration: typed dataclasses in sections, validated once, written as JSON
into the run folder and into every checkpoint.

`TrainConfig`'s sections: `model` (the network), `objective` (what it is trained for: the registered
objective and its settings, `fastdit.objectives`), `optimisation`, one section per training extension
(the EMA, post-hoc EMAs, REPA's `alignment`, token `routing`, `dispersion`, ...: each extension's
module declares its own, `fastdit.train.extensions`), `data`, `run` (systems, run folder, logging),
`evaluation` (FIDs during training) and `recipe` (how the checkpoints recommend being sampled). Every
field carries its flag's help text, and `fastdit train`'s flat flags (`--lr`, `--objective`, ...) are
generated from these fields: each name, type, default and help is written once, here (or in the
objective's or the extension's module). Field names are unique over the sections, so a flat
{flag name: value} dict (what run folders recorded before the sections, and what `refuse_other_run`
compares) maps to the sections without ambiguity.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..cpu_threads import MAX_DATA_WORKERS, data_workers
from ..errors import UserError
from ..latents import PIXEL_SPACE_NAMES, check_image_size
from ..models import BLOCK_OPTIONS, MLPS, NORMS, config_from_name
from ..objectives import OBJECTIVES, Objective, all_settings, build_objective, objective_names
from ..precision import PRECISIONS
from ..run_folder import refuse_other_settings
from ..sampling import SamplingOptions
from ..seeding import MAX_SEED
from .extensions import EXTENSIONS
from .options import SectionedConfig, check_numbers, flag_name, option, section_fields
from .presets import train_preset_names
from .setup import checkpoint_stride


@dataclass
class ModelSection:
    name: str = option("DiT-XL/2", "preset name, e.g. DiT-XL/2, DiT-B/4, DiT-T/2, DiTDH-XL (RAE's DiT^DH: with "
                                   "--objective rae)", flag="model")
    image_size: int = option(256, "image side in pixels", at_least=1)
    num_classes: int | None = option(None, "number of classes (default: the data's: a folder's subfolders, a latent "
                                            "store's record; 1 with --class-dropout-prob 0 trains an unconditional "
                                            "model)", at_least=1)
    class_dropout_prob: float = option(0.1, "label dropout for classifier-free guidance (0: unconditional)",
                                       unit_interval=True)
    # The output channels and the block options (LightningDiT): unset, the preset's (a DiT's: the learned
    # variance and the official blocks; a DiT^DH's: RAE's velocity alone, RMSNorm, SwiGLU and RoPE).
    learn_sigma: bool | None = option(None, "predict the variance too (2C output channels; DiT's learned-range "
                                            "variance) (default: the preset's: on for DiT, off for DiT^DH)")
    norm: str | None = option(None, f"{NORMS[0]} (official) or {' or '.join(NORMS[1:])} (default: the preset's: "
                                    f"{NORMS[0]} for DiT, rmsnorm for DiT^DH)", choices=NORMS)
    mlp: str | None = option(None, f"{MLPS[0]} (official) or {' or '.join(MLPS[1:])} (parameter-matched) (default: "
                                   f"the preset's: {MLPS[0]} for DiT, swiglu for DiT^DH)", choices=MLPS)
    rope: bool | None = option(None, "2-D rotary position embedding on q and k (default: the preset's: off for DiT, "
                                     "on for DiT^DH)")
    qk_norm: bool | None = option(None, "normalise q and k of every head (default: the preset's: off)")
    init_from: str | None = option(None, "start from these weights (fine-tuning): an official model (DiT-XL/2, "
                                         "SiT-XL/2: the release at --image-size) or a checkpoint or export; the "
                                         "class count and image size may differ, the optimizer starts afresh")
    # model-size overrides (the tiny demo model); None keeps the preset's value
    depth: int | None = option(None, "override the preset's depth", at_least=1)
    hidden_size: int | None = option(None, "override the preset's width", at_least=1)
    num_heads: int | None = option(None, "override the preset's attention heads", at_least=1)

    def __post_init__(self) -> None:
        # An unset block option or output is the preset's, resolved here so that a run records what it
        # trains (and old run folders, which recorded the DiT's values, compare equal). An unknown name is
        # left for `validate` to report.
        unset = [name for name in (*BLOCK_OPTIONS, "learn_sigma") if getattr(self, name) is None]
        if unset:
            try:
                preset = config_from_name(self.name)
            except UserError:
                return
            for name in unset:
                setattr(self, name, getattr(preset, name))

    def options(self) -> dict:
        """The DiTConfig fields this run sets beyond the preset (size overrides and block options). Before
        the class count is read from the data (`num_classes` None) it is 1 here: the checks that run then
        do not depend on it."""
        overrides = {k: getattr(self, k) for k in ("depth", "hidden_size", "num_heads") if getattr(self, k) is not None}
        blocks = {k: getattr(self, k) for k in (*BLOCK_OPTIONS, "learn_sigma") if getattr(self, k) is not None}
        return {**overrides, **blocks, "num_classes": self.num_classes or 1, "class_dropout_prob": self.class_dropout_prob}


def _objective_section() -> type:
    """The objective section: the objective's name and every registered objective's settings (one
    flag each, with the objective module's own help text)."""
    trained_for = "; ".join(f"{name} ({OBJECTIVES[name].summary})" for name in objective_names())
    fields = [("name", str, option("ddpm", f"what the network is trained for: {trained_for}; recorded in checkpoints",
                                   flag="objective", choices=objective_names()))]
    for name, setting in all_settings().items():
        fields.append((name, setting.type, option(setting.default, setting.metadata["help"],
                                                  choices=setting.metadata.get("choices"))))

    def build(self) -> Objective:
        return build_objective(self.name, **{k: v for k, v in dataclasses.asdict(self).items() if k != "name"})

    return dataclasses.make_dataclass("ObjectiveSection", fields, namespace={"build": build})


ObjectiveSection = _objective_section()


@dataclass
class DataSection:
    features_path: str | None = option(None, "latent store written by `fastdit extract` (fastest)")
    data_path: str | None = option(None, "image folder with one subfolder per class (encoded on the fly), or 'digits'")
    # "ema"/"mse"/a folder: the SD VAE; "pixels": pixel space; None: the store's VAE for a latent
    # store, pixels for the digits, "ema" (as DiT trains) for an image folder.
    vae: str | None = option(None, "ema, mse, a diffusers AutoencoderKL folder, an RAE space (rae:dinov2-b-reg, "
                                   "rae:dinov2-b-reg-512, rae:FOLDER), or pixels (default: the store's VAE; ema for "
                                   "images; pixels for digits)")
    num_workers: int = option(data_workers(), "data loader worker processes (default: one per usable core, at most "
                                              f"{MAX_DATA_WORKERS})", at_least=0)

    @property
    def source(self) -> str:
        return self.features_path or self.data_path or ""

    @property
    def pixel_space(self) -> bool:
        if self.vae is None:
            return self.data_path == "digits"
        return self.vae in PIXEL_SPACE_NAMES


@dataclass
class OptimisationSection:
    # DiT paper: AdamW, lr 1e-4, no weight decay, batch 256, EMA 0.9999
    global_batch_size: int = option(256, "images per optimizer step, over all processes", at_least=1)
    micro_batch_size: int | None = option(None, "images per forward pass on one process; smaller than the per-process "
                                                "batch -> gradient accumulation", at_least=1)
    lr: float = option(1e-4, "AdamW learning rate (DiT: 1e-4)", positive=True)
    weight_decay: float = option(0.0, "AdamW weight decay", at_least=0)
    # AdamW (Loshchilov & Hutter 2019) needs betas in [0, 1)
    beta1: float = option(0.9, "AdamW beta1", unit_interval=True)
    beta2: float = option(0.999, "AdamW beta2", unit_interval=True)
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", at_least=0)
    # RAE's DiT^DH schedule (Zheng et al. 2025, configs/stage2/training: its "linear" scheduler): --lr until
    # --lr-decay-start, then linear to --final-lr at --lr-decay-end, then --final-lr to the end.
    final_lr: float | None = option(None, "learning rate at the end of a linear decay (default: no decay, constant --lr)",
                                    positive=True)
    lr_decay_start: int = option(0, "step the linear decay to --final-lr starts at", at_least=0)
    lr_decay_end: int = option(0, "step the linear decay to --final-lr ends at (after --lr-decay-start)", at_least=0)
    grad_clip: float | None = option(None, "clip the gradient norm to this value", positive=True,
                                     hint="; leave --grad-clip out for no clipping")
    skip_nonfinite: int = option(0, "skip a step whose loss or gradient is not finite (no update; its batch and draws "
                                    "are used up), up to this many in a row; one more stops the run (0: stop at the first)",
                                 at_least=0)
    epochs: int = option(1400, "epochs to train (--max-steps wins when given)", at_least=1)
    max_steps: int | None = option(None, "optimizer steps to train", at_least=1)
    global_seed: int = option(0, "seed of everything random", at_least=0, at_most=MAX_SEED)


@dataclass
class RunSection:
    # systems
    precision: str = option("fp32", "fp32, bf16 or fp16 (with a gradient scaler)", choices=PRECISIONS)
    gradient_checkpointing: str = option("off", "recompute activations in backward to save memory: off, blocks "
                                                "(every block; the flag alone), mlp (each block's MLP only) or every-K "
                                                "(blocks 0, K, 2K, ...)", flag_alone="blocks")
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state over the processes (FSDP2) instead of DDP")
    fsdp_shard_size: int | None = option(None, "with --fsdp: shard within groups of this many processes (a node's GPUs) "
                                               "and replicate across the groups (hybrid sharding, HSDP); default: shard "
                                               "over every process", at_least=1)
    ddp_bucket_mb: int = option(25, "DDP's gradient bucket size in MiB (PyTorch's default; larger: fewer, larger "
                                    "all-reduces)", at_least=1)
    ddp_bf16_grads: bool = option(False, "DDP: all-reduce the gradients in bf16 (half the bytes; each process's "
                                         "gradient rounded to bf16 before the sum), float32 otherwise")
    compile: bool = option(False, "torch.compile each transformer block (regional: start-up compiles one block, not the model)")
    tf32: bool = option(True, "TF32 matmuls on GPUs")
    device: str = option("auto", "auto (cuda if available), cpu, cuda")
    # run folder, logging, checkpoints
    results_dir: str = option("results", "folder of run folders")
    run_name: str | None = option(None, "run folder name (default: model, image size and data); the same command resumes it")
    log_every: int = option(100, "log every N steps", at_least=1)
    ckpt_every: int = option(50_000, "checkpoint every N steps (and at the end)", at_least=1)
    keep_last: int = option(3, "checkpoints to keep", at_least=1)
    sample_every: int = option(0, "write an EMA sample grid every N steps (0: never)", at_least=0)
    sample_steps: int = option(50, "sampling steps for those grids (the objective's own sampler)", at_least=1)
    tensorboard: bool = option(True, "write TensorBoard event files")
    wandb: bool = option(False, "log to Weights & Biases")
    progress: bool = option(True, "show a progress bar")
    # The training preset the run started from (`fastdit.train.presets`): a record of where its settings
    # came from; the settings themselves are the fields, so a preset changed later does not change a run.
    preset: str | None = option(None, "start from a published recipe (every field of it; each flag given overrides "
                                      f"one): {', '.join(train_preset_names())}; `fastdit presets` lists them")

    def __post_init__(self):
        # Run folders and checkpoints written before the policies record a bool: on meant every block.
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = "blocks" if self.gradient_checkpointing else "off"


@dataclass
class EvaluationSection:
    eval_every: int = option(0, "FID of the EMA model every N steps (0: never; needs --eval-ref)", at_least=0)
    eval_samples: int = option(1000, "samples for that FID", at_least=1)
    eval_ref: str | None = option(None, "reference .npz / folder / statistics for that FID")
    eval_batch_size: int = option(32, "images per sampling batch for that FID", at_least=1)
    eval_sampling_steps: int = option(250, "sampling steps for that FID (the objective's own sampler)", at_least=1)
    eval_cfg_scale: float = option(1.0, "guidance scale for that FID (1: none, as the paper's training curves)")
    inception_weights: str | None = option(None, "local Inception weights for --eval-every")


@dataclass
class RecipeSection:
    # Recorded in every checkpoint and export (`ModelInfo.sampling`): how `fastdit sample`, `sample-ddp`,
    # `app` and `generate` sample the model when no flag says otherwise. Unset: the objective's own.
    recipe_sampler: str | None = option(None, "the sampler the checkpoints recommend (default: the objective's own)")
    recipe_steps: int | None = option(None, "the sampling steps the checkpoints recommend (default: the objective's "
                                            "own: 250, MeanFlow 1)", at_least=1)
    recipe_cfg_scale: float | None = option(None, "the guidance scale the checkpoints recommend (default: left to "
                                                  "the sampling command; 1 when guidance is trained in or impossible)",
                                            at_least=1)


# The sections in order (and in `fastdit train --help`): the extensions' between optimisation and data.
SECTIONS = {"model": ModelSection, "objective": ObjectiveSection, "optimisation": OptimisationSection,
            **{cls.section: cls.settings for cls in EXTENSIONS.values()},
            "data": DataSection, "run": RunSection, "evaluation": EvaluationSection, "recipe": RecipeSection}


def flat_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """{flat key: (section, field)} over every section."""
    return section_fields(SECTIONS)


# Fields that may change between the first run and a resumed one: how long and how chatty the run is,
# and purely mechanical settings. Everything else defines the run and must match to resume.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs", "max_steps", "log_every", "ckpt_every", "keep_last", "sample_every", "num_workers",
        "compile", "sample_steps", "tensorboard", "wandb", "device", "eval_every", "eval_samples", "eval_ref",
        "eval_batch_size", "eval_sampling_steps", "eval_cfg_scale", "micro_batch_size", "gradient_checkpointing",
        "results_dir", "run_name", "inception_weights", "progress",
        "recipe_sampler", "recipe_steps", "recipe_cfg_scale",  # what the checkpoints recommend, not how they are made
        "skip_nonfinite",  # a run stopped by a non-finite step may go on with it: it changes nothing else
        "ddp_bucket_mb", "fsdp_shard_size",  # how the same sums are carried and grouped
        "preset",  # a record of where the settings came from; the settings are compared themselves
    }
) | {flag_name(f) for cls in EXTENSIONS.values() for f in dataclasses.fields(cls.settings) if f.metadata.get("resumable")}


def _check_sampling(flags: str, options, objective: Objective) -> None:
    """The grids' and FID's sampling settings, checked by the sampler's own rules before training."""
    try:
        options.validate(objective)
    except UserError as err:
        raise UserError(f"{flags}: {err}") from None


class _TrainConfigMethods(SectionedConfig):
    """What `TrainConfig` does; its fields, one per section of SECTIONS, are made below."""

    SECTIONS = SECTIONS
    KIND = "training"

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """From `to_dict`'s sections, or the flat form run folders recorded before the sections.
        Settings that are no longer known are dropped (they were recorded by another version)."""
        if not isinstance(data, dict):
            raise UserError(f"a run config must be a JSON object, got {type(data).__name__}")
        if set(data) <= set(SECTIONS) and all(isinstance(v, dict) for v in data.values()):
            flat = {k: v for part in data.values() for k, v in part.items()}
        else:
            flat = data
        known = flat_fields()
        return cls.create(**{k: v for k, v in flat.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ------------------------------------------------------------------------------------------

    def resolved_run_name(self) -> str:
        if self.run.run_name:
            return self.run.run_name
        data = Path(self.data.source.rstrip("/")).name or "data"
        return f"{self.model.name.replace('/', '-')}-{self.model.image_size}px-{data}"

    def run_dir(self) -> Path:
        return Path(self.run.results_dir) / self.resolved_run_name()

    def build_objective(self) -> Objective:
        return self.objective.build()

    def model_options(self) -> dict:
        """The DiTConfig fields beyond the preset: the model section's, and what the objective's network
        needs (MeanFlow's time-gap embedding)."""
        return {**self.model.options(), **self.build_objective().network()}

    def sampling_recipe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        """The sampling recipe the run's checkpoints record (`fastdit.sampling.recipe.training_recipe`), for
        a model of inputs `input_shape` (C, H, W) once the data says it (RAE's time shift follows it)."""
        from ..sampling.recipe import training_recipe

        recipe = self.recipe
        return training_recipe(self.build_objective(), conditional=self.model.class_dropout_prob > 0,
                               sampler=recipe.recipe_sampler, num_steps=recipe.recipe_steps,
                               cfg_scale=recipe.recipe_cfg_scale, input_shape=input_shape)

    def validate(self) -> "TrainConfig":
        data = self.data
        if not data.features_path and not data.data_path:
            raise UserError("no training data: pass --features-path (a latent store from `fastdit extract`), "
                            "--data-path (an image folder), or --data-path digits")
        if data.features_path and data.data_path:
            raise UserError("pass either --features-path or --data-path, not both")
        if self.run.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.run.precision!r}; choose one of {', '.join(PRECISIONS)}")
        self._validate_numbers()
        checkpoint_stride(self.run.gradient_checkpointing)  # rejects an unknown checkpointing policy
        if self.run.fsdp and self.run.precision == "fp16":
            raise UserError("--fsdp trains in fp32 or bf16 (fp16's gradient scaler is not supported on sharded "
                            "gradients); use --precision bf16")
        if self.run.fsdp_shard_size is not None and not self.run.fsdp:
            raise UserError("--fsdp-shard-size sets how --fsdp shards; add --fsdp, or leave it out")
        if self.run.fsdp and self.run.ddp_bf16_grads:
            raise UserError("--ddp-bf16-grads reduces DDP's gradients; under --fsdp the gradients are reduced in float32 "
                            "(its mixed precision); leave one of them out")
        if self.run.fsdp and self.evaluation.eval_every:
            raise UserError("--fsdp does not yet compute FIDs during training; leave --eval-every at 0 and run "
                            "`fastdit evaluate` on the exported EMA checkpoints")
        objective = self.build_objective()  # rejects an unknown objective or a setting out of range
        architecture = config_from_name(self.model.name, **self.model_options())  # rejects options that do not fit
        objective.check_network(architecture)  # a DiT^DH embeds a time in [0, 1]: flow-time objectives only
        trained_guidance = objective.sampling.trained_guidance
        if trained_guidance is not None and self.model.class_dropout_prob <= 0:
            raise UserError(f"the {objective.name} objective trains guidance in (scale {trained_guidance:g}), "
                            f"which needs the null class: set --class-dropout-prob > 0 (the paper: 0.1)")
        for extension in EXTENSIONS.values():  # every one, enabled or not: a malformed setting is an error
            extension.validate(self, architecture)
        evaluation = self.evaluation
        if evaluation.eval_every and evaluation.eval_samples < 2:
            raise UserError(f"--eval-samples must be >= 2 for a covariance, got {evaluation.eval_samples}")
        if evaluation.eval_every and not evaluation.eval_ref:
            raise UserError("--eval-every needs --eval-ref (reference statistics or images to compare with)")
        if self.run.sample_every:
            _check_sampling("--sample-steps", SamplingOptions(num_steps=self.run.sample_steps, cfg_scale=1.0), objective)
        if evaluation.eval_every:
            _check_sampling("--eval-sampling-steps / --eval-cfg-scale", SamplingOptions(
                num_steps=evaluation.eval_sampling_steps, cfg_scale=evaluation.eval_cfg_scale), objective)
        optim = self.optimisation
        if optim.final_lr is not None and optim.lr_decay_end <= optim.lr_decay_start:
            raise UserError(f"--lr-decay-end ({optim.lr_decay_end}) must come after --lr-decay-start "
                            f"({optim.lr_decay_start}) for a decay to --final-lr")
        if optim.final_lr is None and (optim.lr_decay_start or optim.lr_decay_end):
            raise UserError("--lr-decay-start / --lr-decay-end need --final-lr, the rate the decay ends at")
        recommended = self.sampling_recipe()
        _check_sampling("--recipe-sampler / --recipe-steps / --recipe-cfg-scale", SamplingOptions(**recommended),
                        objective)
        if recommended.get("cfg_scale", 1.0) > 1 and self.model.class_dropout_prob <= 0:
            raise UserError("--recipe-cfg-scale > 1 needs a null class to guide with: set --class-dropout-prob > 0")
        # A latent store records its own space (VAE latents or pixels) and image size; the data check
        # (`open_training_data`) compares them, so only an image folder encoded on the fly is checked here.
        if not data.pixel_space and not data.features_path:
            check_image_size(data.vae or "ema", self.model.image_size)
        return self

    def _validate_numbers(self) -> None:
        check_numbers({section: getattr(self, section) for section in SECTIONS})

    def refuse_other_run(self, requested: "TrainConfig", what: str, fix: str) -> None:
        """Raise a UserError naming the fields that define the run (not RESUMABLE_CHANGES) and differ."""
        refuse_other_settings(what, self.to_flat(), requested.to_flat(), fix, ignore=RESUMABLE_CHANGES)


# One field per section, each defaulting to its dataclass's defaults: `config.model.name`, `config.alignment.repa`.
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(name, cls, field(default_factory=cls)) for name, cls in SECTIONS.items()],
    bases=(_TrainConfigMethods,), namespace={"__module__": __name__},
)
TrainConfig.__doc__ = "A training run's settings, in SECTIONS; `TrainConfig.create(**flat)` from flat flag names."
