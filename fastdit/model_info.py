"""What a set of weights is, and how its inputs are encoded: the record that travels with every
checkpoint and export (as JSON in its metadata) and that every loader hands back with the model.

`ModelInfo` holds the architecture (`DiTConfig`), the space the model's inputs live in (`LatentInfo`:
SD-VAE latents or pixels, and the latent scale), what the weights were trained for (the objective,
`fastdit.objectives`), and the class names, so that a file can be sampled without being told how it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .latents import SD_VAE_SCALE, VAE_DOWNSAMPLE
from .models import DiTConfig, preset_of
from .objectives import Objective, build_objective, objective_from_dict


@dataclass
class LatentInfo:
    """Which space a model's inputs live in: "vae" (SD VAE latents, 8x down) or "pixels"."""

    kind: str = "vae"
    vae: str | None = "mse"
    scale_factor: float = SD_VAE_SCALE

    @property
    def downsample(self) -> int:
        return VAE_DOWNSAMPLE if self.kind == "vae" else 1


@dataclass
class ModelInfo:
    """What a set of weights is; `to_dict` is the JSON every checkpoint and export carries."""

    config: DiTConfig
    latent: LatentInfo = field(default_factory=LatentInfo)
    source: str = ""
    class_names: list[str] | None = None
    # What the weights were trained for; files from before it was recorded hold DDPM (IDDPM ε) models.
    objective: Objective = field(default_factory=lambda: build_objective("ddpm"))
    # How the weights should be sampled when no flag says otherwise (`fastdit.sampling.recipe`): the
    # training's sampler, steps and guidance. None in files from before it was recorded.
    sampling: dict | None = None

    @property
    def image_size(self) -> int:
        return self.config.input_size * self.latent.downsample

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.config),
            "latent": asdict(self.latent),
            "class_names": self.class_names,
            "preset": preset_of(self.config),
            "objective": self.objective.to_dict(),
            **({"sampling": self.sampling} if self.sampling is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "ModelInfo":
        return cls(
            config=DiTConfig(**data["model"]),
            latent=LatentInfo(**data.get("latent", {})),
            source=source,
            class_names=data.get("class_names"),
            # Recorded as "process" before objectives were objects: the same fields.
            objective=objective_from_dict(data.get("objective", data.get("process"))),
            sampling=data.get("sampling"),
        )
