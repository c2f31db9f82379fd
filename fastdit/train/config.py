"""The training run's configuration: one typed dataclass, validated once, written as JSON into the run
folder and into every checkpoint. The CLI flags are generated from its fields."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from ..latents import PIXEL_SPACE_NAMES, latent_side
from ..models import config_from_name
from ..process import ProcessSpec
from ..run_folder import refuse_other_settings
from ..sampling import SamplingOptions
from .setup import checkpoint_stride

PRECISIONS = ("fp32", "bf16", "fp16")

# Fields that may change between the first run and a resumed one: how long and how chatty the run is,
# and purely mechanical settings. Everything else defines the run and must match to resume.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs", "max_steps", "log_every", "ckpt_every", "keep_last", "sample_every", "num_workers",
        "compile", "sample_steps", "tensorboard", "wandb", "device", "eval_every", "eval_samples", "eval_ref",
        "eval_batch_size", "eval_sampling_steps", "eval_cfg_scale", "micro_batch_size", "gradient_checkpointing", "results_dir", "run_name",
        "inception_weights", "progress",
    }
)


# The range of each number field (fields not listed may be any finite number).
AT_LEAST = {
    "image_size": 1, "num_classes": 1, "num_workers": 0, "global_batch_size": 1, "micro_batch_size": 1,
    "epochs": 1, "max_steps": 1, "log_every": 1, "ckpt_every": 1, "keep_last": 1, "sample_every": 0,
    "sample_steps": 1, "eval_every": 0, "eval_samples": 1, "eval_batch_size": 1, "eval_sampling_steps": 1,
    "global_seed": 0, "depth": 1, "hidden_size": 1, "num_heads": 1, "warmup_steps": 0, "weight_decay": 0,
}
# AdamW (Loshchilov & Hutter 2019) needs a positive step size and betas in [0, 1); a gradient norm
# to clip to must be positive (leave --grad-clip out for no clipping).
POSITIVE = {"lr", "grad_clip"}
HINTS = {"grad_clip": "; leave --grad-clip out for no clipping"}
UNIT_INTERVAL = {"beta1", "beta2", "ema_decay", "class_dropout_prob"}  # [0, 1)


def _check_sampling(flags: str, options, process: ProcessSpec) -> None:
    """The grids' and FID's sampling settings, checked by the sampler's own rules before training."""
    try:
        options.validate(process)
    except UserError as err:
        raise UserError(f"{flags}: {err}") from None


@dataclass
class TrainConfig:
    # model
    model: str = "DiT-XL/2"
    image_size: int = 256
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (0 for unconditional)
    learn_sigma: bool = True
    # the process, recorded in checkpoints: DiT's "ddpm" (IDDPM), or "flow" (SiT: linear path, velocity)
    objective: str = "ddpm"
    time_sampling: str = "uniform"  # flow: "uniform" (SiT) or "logit-normal" (SD3)
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # block options (LightningDiT); the official DiT blocks when off
    norm: str = "layernorm"
    mlp: str = "gelu"
    rope: bool = False
    qk_norm: bool = False
    # data: a latent store (--features-path), an image folder (--data-path), or "digits"
    features_path: str | None = None
    data_path: str | None = None
    # "ema"/"mse"/a folder: the SD VAE; "pixels": pixel space; None: the store's VAE for a latent
    # store, pixels for the digits, "ema" (as DiT trains) for an image folder.
    vae: str | None = None
    num_workers: int = 4
    # optimisation (DiT paper: AdamW, lr 1e-4, no weight decay, batch 256, EMA 0.9999)
    global_batch_size: int = 256
    micro_batch_size: int | None = None  # per process; gradient accumulation when < local batch
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    grad_clip: float | None = None
    ema_decay: float = 0.9999
    epochs: int = 1400
    max_steps: int | None = None
    global_seed: int = 0
    # systems
    precision: str = "fp32"
    gradient_checkpointing: str = "off"  # off, blocks, mlp or every-K (fastdit.train.setup.checkpoint_blocks)
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    compile: bool = False
    tf32: bool = True
    device: str = "auto"
    # run folder, logging, checkpoints
    results_dir: str = "results"
    run_name: str | None = None
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_last: int = 3
    sample_every: int = 0
    sample_steps: int = 50
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    # evaluation during training (FID of the EMA model)
    eval_every: int = 0
    eval_samples: int = 1000
    eval_ref: str | None = None
    eval_batch_size: int = 32
    eval_sampling_steps: int = 250
    eval_cfg_scale: float = 1.0  # FID without guidance, as the DiT paper's training curves
    inception_weights: str | None = None
    # model-size overrides (the tiny demo model); None keeps the preset's value
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None

    # ------------------------------------------------------------------------------------------

    def __post_init__(self):
        # Run folders and checkpoints written before the policies record a bool: on meant every block.
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = "blocks" if self.gradient_checkpointing else "off"

    @property
    def data_source(self) -> str:
        return self.features_path or self.data_path or ""

    @property
    def pixel_space(self) -> bool:
        if self.vae is None:
            return self.data_path == "digits"
        return self.vae in PIXEL_SPACE_NAMES

    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        data = Path(self.data_source.rstrip("/")).name or "data"
        return f"{self.model.replace('/', '-')}-{self.image_size}px-{data}"

    def run_dir(self) -> Path:
        return Path(self.results_dir) / self.resolved_run_name()

    def process_spec(self) -> ProcessSpec:
        return ProcessSpec(self.objective, self.time_sampling, self.logit_normal_mean, self.logit_normal_std)

    def model_options(self) -> dict:
        """The DiTConfig fields this run sets beyond the preset (size overrides and block options)."""
        overrides = {k: getattr(self, k) for k in ("depth", "hidden_size", "num_heads") if getattr(self, k) is not None}
        blocks = {k: getattr(self, k) for k in ("norm", "mlp", "rope", "qk_norm")}
        return {**overrides, **blocks, "num_classes": self.num_classes, "class_dropout_prob": self.class_dropout_prob,
                "learn_sigma": self.learn_sigma}

    def validate(self) -> "TrainConfig":
        if not self.features_path and not self.data_path:
            raise UserError("no training data: pass --features-path (a latent store from `fastdit extract`), "
                            "--data-path (an image folder), or --data-path digits")
        if self.features_path and self.data_path:
            raise UserError("pass either --features-path or --data-path, not both")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        self._validate_numbers()
        checkpoint_stride(self.gradient_checkpointing)  # rejects an unknown checkpointing policy
        if self.fsdp and self.precision == "fp16":
            raise UserError("--fsdp trains in fp32 or bf16 (fp16's gradient scaler is not supported on sharded "
                            "gradients); use --precision bf16")
        if self.fsdp and self.eval_every:
            raise UserError("--fsdp does not yet compute FIDs during training; leave --eval-every at 0 and run "
                            "`fastdit evaluate` on the exported EMA checkpoints")
        process = self.process_spec()  # rejects an unknown objective or time sampling
        config_from_name(self.model, **self.model_options())  # rejects options that do not fit the width
        if self.eval_every and self.eval_samples < 2:
            raise UserError(f"--eval-samples must be >= 2 for a covariance, got {self.eval_samples}")
        if self.eval_every and not self.eval_ref:
            raise UserError("--eval-every needs --eval-ref (reference statistics or images to compare with)")
        if self.sample_every:
            _check_sampling("--sample-steps", SamplingOptions(num_steps=self.sample_steps, cfg_scale=1.0), process)
        if self.eval_every:
            _check_sampling("--eval-sampling-steps / --eval-cfg-scale", SamplingOptions(
                num_steps=self.eval_sampling_steps, cfg_scale=self.eval_cfg_scale), process)
        if not self.pixel_space:
            latent_side(self.image_size)
        return self

    def _validate_numbers(self) -> None:
        """Every number field: the right type, finite, and in its range. A NaN fails every comparison
        (so `lr <= 0` lets it through): finiteness is checked first, on its own."""
        hints = typing.get_type_hints(TrainConfig)
        for field in dataclasses.fields(self):
            value, kinds = getattr(self, field.name), typing.get_args(hints[field.name]) or (hints[field.name],)
            flag = "--" + field.name.replace("_", "-")
            if (int not in kinds and float not in kinds) or (value is None and type(None) in kinds):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if int in kinds else numbers.Real):
                raise UserError(f"{flag} must be a {'whole ' if int in kinds else ''}number, got {value!r}")
            if not math.isfinite(value):
                raise UserError(f"{flag} must be a finite number, got {value}{HINTS.get(field.name, '')}")
            if field.name in POSITIVE and not value > 0:
                raise UserError(f"{flag} must be > 0, got {value}{HINTS.get(field.name, '')}")
            if field.name in UNIT_INTERVAL and not 0 <= value < 1:
                raise UserError(f"{flag} must be in [0, 1), got {value}")
            if value < AT_LEAST.get(field.name, value):
                raise UserError(f"{flag} must be >= {AT_LEAST[field.name]}, got {value}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def refuse_other_run(self, requested: "TrainConfig", what: str, fix: str) -> None:
        """Raise a UserError naming the fields that define the run (not RESUMABLE_CHANGES) and differ."""
        refuse_other_settings(what, self.to_dict(), requested.to_dict(), fix, ignore=RESUMABLE_CHANGES)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
