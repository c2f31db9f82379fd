"""The RAE latent space: images <-> normalised DINOv2 tokens, the diffusion model's inputs.

RAE (Zheng, Ma, Tong & Xie 2025, arXiv:2510.11690): the latent of an image is its frozen encoder's patch
tokens as a grid (C, h, w) = (768, 16, 16) at 256 px, normalised per element with statistics measured on
ImageNet (stage1/rae.py `encode`):

    z = (tokens - mean) / sqrt(var + eps),    eps = 1e-5, mean and var of shape (C, h, w)

and decoding undoes it before the ViT decoder: tokens = z * sqrt(var + eps) + mean. The encoder is
deterministic, so a latent store keeps no posterior std for it (`deterministic`).

Names (`--vae`):

  rae:dinov2-b-reg        RAE's released space at 256 px (DINOv2-B with registers, ViT-XL decoder)
  rae:dinov2-b-reg-512    the same encoder at 448 px (32x32 tokens), its 512-px decoder and statistics
  rae:FOLDER              a local RAE folder: `rae.json` and the files it names (`RAE_JSON_FIELDS`)

A local folder's rae.json, e.g. for a decoder trained here on the released encoder:

  {"encoder": "dinov2-vitb14-reg",   a name in fastdit.encoders.ENCODERS, or a folder (relative to this
                                     one) with a DINOv2-with-registers config.json and model.safetensors
   "encoder_input_size": 224,
   "decoder": "ViT-XL",              a preset of fastdit.rae.decoder, or {"hidden_size", "depth",
                                     "num_heads", "mlp_size", "patch_size"}
   "decoder_weights": "model.pt",    RAE's key layout: torch.save'd state dict (.pt) or .safetensors
   "stats": "stat.pt",               torch.save'd {"mean": tensor, "var": tensor}, each (C, h, w)
   "eps": 1e-5,                      optional
   "channels": 3}                    optional: the images' channels (1 for gray images such as the digits)

The encoder may also be a TorchScript file (.pt/.ts, relative to the folder) mapping normalised images to
patch tokens, as `fastdit.encoders.load_encoder` reads it (the digits demo's encoder): `fastdit
train-decoder` writes such a folder for a decoder trained on its tokens. The latent space is then that
encoder's tokens, normalised with the folder's statistics, as for DINOv2.

The released files are fetched once into fastdit's cache (`fastdit.hub.download`: progress bar, `.part`
file renamed when complete; offline, one line naming the file, its address and where to put it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DownloadError, FetchError, UserError, template_text
from ..state_dicts import key_problems
from .decoder import DECODER_PRESETS, RAEDecoder, RAEDecoderConfig, decoder_config, output_normalisation
from .variants import RAE_VARIANTS, STATS_EPS

RAE_PREFIX = "rae:"
RAE_JSON = "rae.json"
# rae.json's fields: the required ones, then the optional ones with their defaults.
RAE_JSON_FIELDS = {"encoder": None, "encoder_input_size": None, "decoder": None,
                   "decoder_weights": "model.pt", "stats": "stat.pt", "eps": STATS_EPS, "channels": 3}
_DECODER_FIELDS = ("hidden_size", "depth", "num_heads", "mlp_size", "patch_size")


def is_rae_name(name) -> bool:
    """Whether a --vae value names an RAE latent space ("rae:...")."""
    return isinstance(name, str) and name.startswith(RAE_PREFIX)


def rae_choices() -> str:
    return ", ".join(RAE_PREFIX + name for name in RAE_VARIANTS) + f" or {RAE_PREFIX}FOLDER (a folder with {RAE_JSON})"


@dataclass(frozen=True)
class RAESpec:
    """What an RAE name describes, read without loading any weights."""

    name: str  # "rae:<variant>" or "rae:<absolute folder>": what checkpoints and stores record
    encoder: str  # a name in fastdit.encoders.ENCODERS, a folder, or a TorchScript file
    encoder_input_size: int
    decoder: RAEDecoderConfig
    decoder_weights: str  # a local path, or a path in RAE's hub repository for a released variant
    stats: str  # likewise
    eps: float = STATS_EPS
    released: bool = False

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.decoder.latent_dim, self.decoder.grid_size, self.decoder.grid_size)

    @property
    def image_size(self) -> int:
        return self.decoder.image_size

    @property
    def channels(self) -> int:
        """The images' channels (3: RGB; 1: gray)."""
        return self.decoder.channels

    @property
    def downsample(self) -> int:
        """Pixels per latent side: the decoder's patch."""
        return self.decoder.patch_size


def describe(name: str) -> RAESpec:
    """The `RAESpec` of "rae:<variant>" or "rae:FOLDER"; a one-line UserError listing the choices otherwise.
    A folder's encoder config.json is read (fetched first for a named encoder: a small file)."""
    if not is_rae_name(name):
        raise UserError(f"{name!r} is not an RAE latent space; choose {rae_choices()}")
    rest = name[len(RAE_PREFIX):].strip()
    if rest in RAE_VARIANTS:
        variant = RAE_VARIANTS[rest]
        config = decoder_config(variant.decoder, latent_dim=variant.latent_dim, grid_size=variant.grid_size,
                                patch_size=variant.decoder_patch)
        return RAESpec(name=RAE_PREFIX + rest, encoder=variant.encoder, encoder_input_size=variant.encoder_input_size,
                       decoder=config, decoder_weights=variant.decoder_file, stats=variant.stats_file, released=True)
    folder = Path(rest).expanduser()
    if not rest or not (folder / RAE_JSON).is_file():
        what = "a folder without rae.json" if folder.is_dir() and rest else "unknown"
        raise UserError(f"RAE latent space {name!r} is {what}; choose {rae_choices()}")
    return _describe_folder(folder.resolve())


def _describe_folder(folder: Path) -> RAESpec:
    from ..io import check_regular_file

    path = check_regular_file(folder / RAE_JSON, "RAE description")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {str(path)!r} as JSON ({err}); fix the file") from None
    if not isinstance(record, dict):
        raise UserError(f"{str(path)!r} is not a JSON object; it holds {', '.join(RAE_JSON_FIELDS)}")
    unknown = sorted(set(record) - set(RAE_JSON_FIELDS))
    missing = [key for key, default in RAE_JSON_FIELDS.items() if default is None and key not in record]
    if unknown or missing:
        problem = f"unknown field(s) {unknown}" if unknown else f"no {', '.join(missing)}"
        raise UserError(f"{str(path)!r} has {problem}; its fields are {', '.join(RAE_JSON_FIELDS)}")
    fields = {**{k: v for k, v in RAE_JSON_FIELDS.items() if v is not None}, **record}
    size = fields["encoder_input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
        raise UserError(f"{str(path)!r} has encoder_input_size {size!r}; it must be a whole number of pixels")
    eps = fields["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise UserError(f"{str(path)!r} has eps {eps!r}; RAE's is 1e-5")
    for key in ("encoder", "decoder_weights", "stats"):
        if not isinstance(fields[key], str) or not fields[key]:
            raise UserError(f"{str(path)!r} has {key} {fields[key]!r}; it must be a name or a file name")
    channels = fields["channels"]
    if channels not in (1, 3) or isinstance(channels, bool):
        raise UserError(f"{str(path)!r} has channels {channels!r}; images have 3 (RGB) or 1 (gray)")
    encoder = _encoder_spec(fields["encoder"], folder)
    hidden, patch = _encoder_shape(encoder, path, size)
    if size % patch:
        raise UserError(f"{str(path)!r} has encoder_input_size {size}, not a multiple of the encoder's patch {patch}")
    decoder = _decoder_config(fields["decoder"], latent_dim=hidden, grid_size=size // patch, where=str(path),
                              channels=channels)
    return RAESpec(name=RAE_PREFIX + str(folder), encoder=encoder, encoder_input_size=size, decoder=decoder,
                   decoder_weights=str(folder / fields["decoder_weights"]), stats=str(folder / fields["stats"]),
                   eps=float(eps))


def _encoder_spec(value: str, folder: Path) -> str:
    from ..encoders import ENCODERS

    return value if value in ENCODERS else str((folder / value).resolve())


def is_torchscript_encoder(encoder: str) -> bool:
    """Whether an RAE folder's encoder is a TorchScript file rather than DINOv2 with registers."""
    from ..encoders import TORCHSCRIPT_SUFFIXES

    return Path(encoder).suffix in TORCHSCRIPT_SUFFIXES


def _load_torchscript_tokens(encoder: str, input_size: int, device="cpu") -> "TokenGrid":
    from ..encoders import load_encoder

    if not Path(encoder).is_file():
        raise UserError(f"the RAE encoder {encoder!r} does not exist; put the TorchScript file there or fix {RAE_JSON}")
    return TokenGrid(load_encoder(encoder, device, resolution=input_size, progress=False))


def _encoder_shape(encoder: str, where: Path, input_size: int) -> tuple[int, int]:
    """(width, patch) from the encoder's config.json (fetched first for a named encoder: a small file); a
    TorchScript encoder is loaded and run once on a blank batch (its token grid at `input_size`)."""
    from ..encoders import CONFIG_FILE, ENCODERS

    if is_torchscript_encoder(encoder):
        tokens = _load_torchscript_tokens(encoder, input_size)
        if input_size % tokens.grid_size:
            raise UserError(f"{str(where)!r}: the encoder {encoder!r} makes a {tokens.grid_size}x{tokens.grid_size} "
                            f"token grid at {input_size} px, which does not divide the image into whole patches")
        return tokens.dim, input_size // tokens.grid_size
    if encoder in ENCODERS:
        config_path = _encoder_file(encoder, CONFIG_FILE, progress=True)
    else:
        config_path = Path(encoder) / CONFIG_FILE
        if not config_path.is_file():
            raise UserError(f"{str(where)!r} names the encoder {encoder!r}, which has no {CONFIG_FILE}; give a name "
                            "such as dinov2-vitb14-reg or a folder with a DINOv2-with-registers config.json and "
                            "model.safetensors")
    try:
        config = json.loads(config_path.read_text())
        return int(config["hidden_size"]), int(config["patch_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read the encoder's width and patch from {str(config_path)!r} ({err})") from None


def _decoder_config(value, *, latent_dim: int, grid_size: int, where: str, channels: int = 3) -> RAEDecoderConfig:
    images = dict(channels=channels, **output_normalisation(channels))
    try:
        if isinstance(value, str):
            if value not in DECODER_PRESETS:
                raise ValueError(f"unknown decoder preset {value!r}; choose one of {', '.join(DECODER_PRESETS)}")
            return decoder_config(value, latent_dim=latent_dim, grid_size=grid_size, **images)
        if not isinstance(value, dict) or set(value) != set(_DECODER_FIELDS):
            raise ValueError(f"decoder must be a preset name or an object with exactly {', '.join(_DECODER_FIELDS)}")
        return RAEDecoderConfig(latent_dim=latent_dim, grid_size=grid_size, **value, **images)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# Files


def _fetch(url: str, filename: str, subdir: str, progress: bool) -> Path:
    """`fastdit.hub.download`, its offline message ending with what a local RAE folder holds."""
    from .. import hub

    try:
        return hub.download(url, filename, subdir=subdir, progress=progress)
    except DownloadError as err:
        raise FetchError(template_text(str(err)) + ", or use a local copy: {vae:rae:FOLDER}, a folder with "
                         f"{RAE_JSON} naming the encoder, decoder and statistics files", "vae") from None


def _released_file(path_in_repo: str, progress: bool) -> Path:
    """A file of RAE's hub repository in fastdit's cache (<cache>/rae/<its path>), downloaded if missing."""
    from .. import hub

    folder, _, filename = path_in_repo.rpartition("/")
    return _fetch(hub.RAE_FILES_URL.format(path=path_in_repo), filename, f"{hub.RAE_CACHE_SUBDIR}/{folder}", progress)


def _encoder_file(encoder: str, filename: str, progress: bool) -> Path:
    """A file of a named encoder's repository, in the cache folder fastdit.encoders uses (one copy of
    DINOv2 for REPA, the metrics and RAE)."""
    from .. import encoders

    repo = encoders.ENCODERS[encoder].repo
    url = encoders.HF_HUB_URL.format(repo=repo, filename=filename)
    return _fetch(url, filename, encoders._cache_folder(repo), progress)


class TokenGrid(torch.nn.Module):
    """A TorchScript encoder (`fastdit.encoders.FrozenEncoder`: images in [-1, 1], gray or RGB -> patch
    tokens (N, T, D)) read as the RAE encoder is: a token grid (N, D, g, g), row-major."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.dim, self.grid_size, self.input_size = encoder.dim, encoder.grid, encoder.resolution

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(images).float()  # (N, T, D)
        return tokens.transpose(1, 2).reshape(len(tokens), self.dim, self.grid_size, self.grid_size)


def _encoder_folder(encoder: str, progress: bool) -> Path:
    from ..encoders import CONFIG_FILE, ENCODERS, WEIGHTS_FILE

    if encoder not in ENCODERS:
        return Path(encoder)
    _encoder_file(encoder, CONFIG_FILE, progress)  # first: small, so an offline machine learns at once
    return _encoder_file(encoder, WEIGHTS_FILE, progress).parent


def _local_file(path: str, what: str) -> Path:
    from ..io import check_regular_file

    if not Path(path).exists():
        raise UserError(f"the RAE {what} {path!r} does not exist; put it there or fix {RAE_JSON}")
    return check_regular_file(path, f"RAE {what}")


def load_tensor_file(path: Path, what: str) -> dict:
    """A dict of tensors from a .safetensors file or a torch.save'd .pt (read with weights_only=True: no code
    is unpickled)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling and safetensors raise many types; say which file
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"cannot read the RAE {what} {str(path)!r} ({type(err).__name__}: {reason}); delete it to "
                        "download it again, or pass a complete file") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"the RAE {what} {str(path)!r} is not a dict of tensors; pass RAE's file")
    return data


def load_decoder_weights(decoder: RAEDecoder, path: Path) -> None:
    """Load a state dict in RAE's key layout with strict=True; a UserError naming what does not fit."""
    state = load_tensor_file(path, "decoder")
    problems = key_problems(decoder.state_dict(), state)
    if problems:
        raise UserError(f"{str(path)!r} does not fit the RAE decoder ({decoder.config.hidden_size} wide, "
                        f"{decoder.config.depth} layers, {decoder.config.grid_size}x{decoder.config.grid_size} tokens): "
                        f"{problems}; pass a decoder state dict in RAE's layout for this space")
    bad = [k for k, v in state.items() if not v.is_floating_point() or not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{str(path)!r} holds non-finite or non-float values in {bad[0]!r}; pass the original weights")
    decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def load_stats(path: Path, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """RAE's statistics file: {"mean", "var"} broadcastable to the latent shape (C, h, w). As RAE does, a
    missing entry means 0 (mean) or 1 (var)."""
    stats = load_tensor_file(path, "statistics")
    if not {"mean", "var"} & set(stats):
        raise UserError(f"the RAE statistics {str(path)!r} hold neither 'mean' nor 'var' (keys: {sorted(stats)[:4]}); "
                        "pass RAE's stat.pt")
    out = []
    for key, default in (("mean", 0.0), ("var", 1.0)):
        value = stats.get(key, torch.full(shape, default)).float()
        try:
            value = torch.broadcast_to(value.reshape(value.shape[-3:]) if value.ndim > 3 and
                                       all(s == 1 for s in value.shape[:-3]) else value, shape).clone()
        except RuntimeError:
            raise UserError(f"the RAE statistics {str(path)!r} have {key} of shape {tuple(value.shape)}, which does "
                            f"not fit latents of shape {shape}; pass the statistics of this space") from None
        if not torch.isfinite(value).all() or (key == "var" and (value < 0).any()):
            raise UserError(f"the RAE statistics {str(path)!r} have a non-finite or negative {key}; pass RAE's file")
        out.append(value)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------
# The space


class RAELatentSpace:
    """Images in [-1, 1] (N, 3, S, S) <-> normalised tokens (N, C, h, w); S = h * the decoder's patch."""

    kind = "rae"
    deterministic = True  # the encoder has no posterior: a latent store keeps the latents alone
    scale_factor = 1.0  # the normalisation is per element, with RAE's statistics (module docstring)

    def __init__(self, name: str, encoder, decoder: RAEDecoder, mean: torch.Tensor, var: torch.Tensor,
                 eps: float = STATS_EPS):
        config = decoder.config
        if (encoder.dim, encoder.grid_size) != (config.latent_dim, config.grid_size):
            raise UserError(f"{name}: the encoder makes {encoder.grid_size}x{encoder.grid_size} tokens {encoder.dim} "
                            f"wide but the decoder reads {config.grid_size}x{config.grid_size} tokens "
                            f"{config.latent_dim} wide; pair a decoder with the encoder it was trained on")
        self.name = name
        self.encoder = encoder
        self.decoder = decoder.eval().requires_grad_(False)
        self.channels = config.latent_dim
        self.image_channels = config.channels  # 3: RGB; 1: gray (a TorchScript encoder's, e.g. the digits)
        self.grid_size = config.grid_size
        self.downsample = config.patch_size
        self.image_size = config.image_size
        self.eps = eps
        self.mean = mean  # (C, h, w)
        self.std = torch.sqrt(var + eps)  # RAE: sqrt(var + eps), in float32

    def to(self, device) -> "RAELatentSpace":
        self.encoder.to(device)
        self.decoder.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, S, S) (gray spaces: (N, 1, S, S)) -> normalised latents (N, C, h, w), float32."""
        self._check_images(images)
        tokens = self.encoder(images)  # (N, C, h, w)
        return (tokens - self.mean) / self.std

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, zeros): the encoder is deterministic (the VAE's interface: mean and std)."""
        latents = self.encode(images)
        return latents, torch.zeros_like(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (N, C, h, w) -> images in [-1, 1] (N, 3, S, S), float32."""
        expected = (self.channels, self.grid_size, self.grid_size)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != expected:
            raise UserError(f"{self.name} decodes latents (N, {', '.join(map(str, expected))}), got "
                            f"{tuple(latents.shape)}")
        return self.decoder(latents.float() * self.std + self.mean)

    def latent_size(self, image_size: int) -> int:
        if image_size != self.image_size:
            raise UserError(f"the RAE latent space {self.name!r} makes {self.image_size}px images (its decoder's "
                            f"size), not {image_size}px; use image size {self.image_size}"
                            + _other_variant_hint(image_size))
        return self.grid_size

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            kind = "RGB" if self.image_channels == 3 else "gray"
            raise UserError(f"{self.name} encodes {kind} images (N, {self.image_channels}, H, W) in [-1, 1], got "
                            f"{tuple(images.shape)}")


def _other_variant_hint(image_size: int) -> str:
    others = [RAE_PREFIX + n for n, v in RAE_VARIANTS.items() if v.image_size == image_size]
    return f", or the space made for {image_size}px: {others[0]}" if others else ""


def check_image_size(name: str, image_size: int) -> None:
    """Refuse, before anything is loaded, an image size the RAE space `name` does not make."""
    spec = describe(name)
    if image_size != spec.image_size:
        raise UserError(f"the RAE latent space {spec.name!r} makes {spec.image_size}px images (its decoder's size), "
                        f"not {image_size}px; use image size {spec.image_size}" + _other_variant_hint(image_size))


def load_rae_space(name: str, *, device: str | torch.device = "cpu", progress: bool = True) -> RAELatentSpace:
    """The RAE latent space named "rae:<variant>" or "rae:FOLDER" (see the module docstring), on `device`.
    Released files come from the cache, downloaded on first use; the encoder's config and weights first
    (they decide the latent shape), then the statistics and the decoder."""
    from .encoder import load_rae_encoder

    spec = describe(name)
    if is_torchscript_encoder(spec.encoder):
        encoder = _load_torchscript_tokens(spec.encoder, spec.encoder_input_size)
    else:
        encoder = load_rae_encoder(_encoder_folder(spec.encoder, progress), spec.encoder_input_size, spec.encoder)
    if spec.released:
        stats_path = _released_file(spec.stats, progress)
        decoder_path = _released_file(spec.decoder_weights, progress)
    else:
        stats_path = _local_file(spec.stats, "statistics")
        decoder_path = _local_file(spec.decoder_weights, "decoder weights")
    mean, var = load_stats(stats_path, spec.latent_shape)
    decoder = RAEDecoder(spec.decoder)
    load_decoder_weights(decoder, decoder_path)
    return RAELatentSpace(spec.name, encoder, decoder, mean, var, eps=spec.eps).to(device)


__all__ = [
    "RAE_JSON",
    "RAE_PREFIX",
    "RAELatentSpace",
    "RAESpec",
    "check_image_size",
    "describe",
    "is_rae_name",
    "load_decoder_weights",
    "load_rae_space",
    "load_stats",
    "rae_choices",
]
