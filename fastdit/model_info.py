"""What a set of weights is, and how its inputs are encoded: the record that travels with every
checkpoint and export (as JSON in its metadata) and that every loader hands back with the model.

`ModelInfo` holds the architecture (`DiTConfig`), the space the model's inputs live in (`LatentInfo`:
SD-VAE latents, RAE latents or pixels, and the latent scale), what the weights were trained for (the objective,
`fastdit.objectives`), and the class names, so that a file can be sampled without being told how it was trained.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field

from .errors import UserError
from .latents import SD_VAE_SCALE, VAE_DOWNSAMPLE, is_rae_name
from .models import DiTConfig, preset_of
from .objectives import Objective, build_objective, objective_from_dict


LATENT_KINDS = ("vae", "pixels", "rae")


@dataclass
class LatentInfo:
    """Which space a model's inputs live in: "vae" (SD VAE latents, 8x down), "pixels", or "rae" (an RAE's
    normalised encoder tokens, `fastdit.rae`; `vae` then holds its name, "rae:<variant>" or "rae:<folder>",
    and `downsample_factor` the pixels per token side, the decoder's patch: 16 for RAE's releases)."""

    kind: str = "vae"
    vae: str | None = "mse"
    scale_factor: float = SD_VAE_SCALE
    downsample_factor: int | None = None  # recorded for "rae" only

    @property
    def downsample(self) -> int:
        if self.kind == "rae":
            return self.downsample_factor
        return VAE_DOWNSAMPLE if self.kind == "vae" else 1

    def to_dict(self) -> dict:
        # downsample_factor only where it is recorded, so that files of the other spaces stay readable by
        # fastdit versions without the field.
        record = asdict(self)
        if record["downsample_factor"] is None:
            del record["downsample_factor"]
        return record

    @classmethod
    def of_space(cls, space) -> "LatentInfo":
        """The record of a loaded latent space (`fastdit.latents.load_latent_space`)."""
        if space.kind == "pixels":
            return cls(kind="pixels", vae=None, scale_factor=1.0)
        if space.kind == "rae":
            return cls(kind="rae", vae=space.name, scale_factor=1.0, downsample_factor=space.downsample)
        return cls(kind="vae", vae=space.name, scale_factor=float(space.scale_factor))

    @classmethod
    def of_store(cls, meta: dict) -> "LatentInfo":
        """The record of a latent store's space, from its meta.json (`fastdit.data.latent_store`)."""
        if meta["vae"] == "pixels":  # `extract --vae pixels`: the store holds the crops themselves
            return cls(kind="pixels", vae=None, scale_factor=1.0)
        if is_rae_name(meta["vae"]):
            return cls(kind="rae", vae=meta["vae"], scale_factor=1.0,
                       downsample_factor=int(meta["image_size"]) // int(meta["latent_shape"][1]))
        return cls(kind="vae", vae=meta["vae"], scale_factor=float(meta.get("scale_factor", SD_VAE_SCALE)))

    def check(self, where: str) -> None:
        """A UserError unless the record is one a space can be built from."""
        if self.kind not in LATENT_KINDS:
            raise UserError(f"{where} has a latent kind {self.kind!r}, not one of {', '.join(map(repr, LATENT_KINDS))}")
        if self.kind == "rae":
            if not is_rae_name(self.vae):
                raise UserError(f"{where} records an RAE latent space named {self.vae!r}, not 'rae:...'; the file is "
                                "damaged")
            factor = self.downsample_factor
            if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
                raise UserError(f"{where} records an RAE latent space with downsample_factor {factor!r}, not a "
                                "positive integer; the file is damaged")


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
            "latent": self.latent.to_dict(),
            "class_names": self.class_names,
            "preset": preset_of(self.config),
            "objective": self.objective.to_dict(),
            **({"sampling": self.sampling} if self.sampling is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "ModelInfo":
        """The record read back; a UserError naming the file when it is not one (wrong types, unknown
        fields): metadata is data from a file, checked before anything is built from it."""
        where = f"the model record of {source!r}" if source else "the model record"
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise UserError(f"{where} is not an object with a 'model' object; the file is damaged or not fastdit's")
        latent = data.get("latent", {})
        if not isinstance(latent, dict):
            raise UserError(f"{where} has a 'latent' of type {type(latent).__name__}, not an object")
        _check_fields(DiTConfig, data["model"], f"{where}, 'model'")
        _check_fields(LatentInfo, latent, f"{where}, 'latent'")
        LatentInfo(**latent).check(where)
        class_names = data.get("class_names")
        if class_names is not None and not (isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)):
            raise UserError(f"{where} has class_names that are not a list of names")
        sampling = data.get("sampling")
        if sampling is not None and not isinstance(sampling, dict):
            raise UserError(f"{where} has a sampling recipe of type {type(sampling).__name__}, not an object")
        recorded = data.get("objective", data.get("process"))  # "process" before objectives were objects
        if recorded is not None and not isinstance(recorded, dict):
            raise UserError(f"{where} has an objective of type {type(recorded).__name__}, not an object")
        try:
            objective = objective_from_dict(recorded)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        except (TypeError, ValueError) as err:
            raise UserError(f"{where} has an objective that does not build ({err})") from None
        return cls(config=DiTConfig(**data["model"]), latent=LatentInfo(**latent), source=source,
                   class_names=class_names, objective=objective, sampling=sampling)


def parse_recorded_json(text: str, source: str) -> dict:
    """The JSON text of a file's metadata (a safetensors export's "model_info"); a UserError naming the file
    when it does not parse."""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise UserError(f"the model record of {source!r} is not valid JSON ({err}); the file is damaged") from None
    if not isinstance(record, dict):
        raise UserError(f"the model record of {source!r} is not an object but {type(record).__name__}; the file is damaged")
    return record


def _check_fields(cls, values: dict, where: str) -> None:
    """Every key is a field of the dataclass `cls` and holds a value of its type (bool is not a number)."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; the file is damaged or "
                        f"from a newer fastdit")
    for name, value in values.items():
        kinds = typing.get_args(hints[name]) or (hints[name],)
        ok = ((value is None and type(None) in kinds)
              or (bool in kinds and isinstance(value, bool))
              or (int in kinds and type(value) is int)
              or (float in kinds and isinstance(value, (int, float)) and not isinstance(value, bool))
              or (str in kinds and isinstance(value, str)))
        if not ok:
            wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise UserError(f"{where} has {name} = {json.dumps(value, default=str)[:40]}, not a {wanted}")
