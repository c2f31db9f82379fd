"""Pretrained files: where they come from, where they are cached, and how they are fetched.

Files are downloaded once into a cache folder (``$FASTDIT_CACHE``, else ``$XDG_CACHE_HOME/fastdit``,
else ``~/.cache/fastdit``), with a progress bar, into a temporary ``.part`` file that is renamed only
when the transfer is complete and has the announced length: a partial file never counts as a model.
"""

from __future__ import annotations

import os
import shlex
import urllib.error
import urllib.request
from pathlib import Path

from .errors import DownloadError, template_text
from .program import script_words

OFFICIAL_DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
# SiT's release (Ma et al. 2024) is served from Dropbox under the name SiT-XL-2-256.pt; it is cached as
# SiT-XL-2-256x256.pt, the name `--model SiT-XL/2 --image-size 256` gives.
OFFICIAL_SIT_URL = (
    "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
    "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"
)

# Official releases: file name -> (model, image size). All are class-conditional ImageNet models in
# the SD-VAE latent space (8x downsampling, 4 channels) with the DiT network; the DiT ones predict ε
# (IDDPM), SiT-XL/2 the velocity of the linear flow (same parameters and names as DiT-XL/2).
OFFICIAL_CHECKPOINTS = {
    "DiT-XL-2-256x256.pt": ("DiT-XL/2", 256),
    "DiT-XL-2-512x512.pt": ("DiT-XL/2", 512),
    "SiT-XL-2-256x256.pt": ("SiT-XL/2", 256),
    # RAE's DiT^DH releases (Zheng et al. 2025), in RAE latents of DINOv2-B: the XL models and the DiT^DH-S
    # models its AutoGuidance guides them by (14 epochs at 256 px, 20 at 512; its sampling configs).
    "DiTDH-XL-256x256.pt": ("DiTDH-XL", 256),
    "DiTDH-S-256x256.pt": ("DiTDH-S", 256),
    "DiTDH-XL-512x512.pt": ("DiTDH-XL", 512),
    "DiTDH-S-512x512.pt": ("DiTDH-S", 512),
}
# Where RAE's releases live (its README: `hf download nyu-visionx/RAE-collections`), by fastdit's name.
RAE_COLLECTIONS_URL = "https://huggingface.co/nyu-visionx/RAE-collections/resolve/main/{path}"
RAE_RELEASE_PATHS = {
    "DiTDH-XL-256x256.pt": "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt",
    "DiTDH-S-256x256.pt": "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-S_ep14/stage2_model.pt",
    "DiTDH-XL-512x512.pt": "DiTs/Dinov2/wReg_base/ImageNet512/DiTDH-XL_ep400/stage2_model.pt",
    "DiTDH-S-512x512.pt": "DiTs/Dinov2/wReg_base/ImageNet512/DiTDH-S_ep20/stage2_model.pt",
}


# RAE's released decoders and latent statistics (Zheng et al. 2025; `fastdit.rae.variants` lists them), cached
# under <cache>/rae/ with the repository's own paths, since every decoder file is called model.pt.
RAE_FILES_URL = "https://huggingface.co/nyu-visionx/RAE-collections/resolve/main/{path}"
RAE_CACHE_SUBDIR = "rae"


def official_objective(model: str) -> str:
    """The process a released model was trained with: "flow" for SiT, "rae" for RAE's DiT^DH, "ddpm" for DiT."""
    if model.startswith("DiTDH-"):
        return "rae"
    return "flow" if model.startswith("SiT-") else "ddpm"


def official_url(filename: str) -> str:
    model, _ = OFFICIAL_CHECKPOINTS[filename]
    if filename in RAE_RELEASE_PATHS:
        return RAE_COLLECTIONS_URL.format(path=RAE_RELEASE_PATHS[filename])
    return OFFICIAL_SIT_URL if official_objective(model) == "flow" else OFFICIAL_DIT_URL.format(name=filename)

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The folder that holds downloaded files; `FASTDIT_CACHE` overrides it."""
    if os.environ.get("FASTDIT_CACHE"):
        return Path(os.environ["FASTDIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fastdit"


def official_dit_name(model: str, image_size: int) -> str:
    return f"{model.replace('/', '-')}-{image_size}x{image_size}.pt"


def download(url: str, filename: str, *, subdir: str = "", progress: bool = True, hint: str = "") -> Path:
    """Return the cached copy of `url`, downloading it first if it is not there yet.

    `hint` is appended to the error message (e.g. which flag takes a local file instead).
    """
    folder = cache_dir() / subdir if subdir else cache_dir()
    target = folder / filename
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(
            f"cannot create the cache folder {str(folder)!r} ({err.strerror}); set FASTDIT_CACHE to a writable folder"
        ) from None
    part = target.with_name(target.name + ".part")

    def fail(reason: str) -> DownloadError:
        message = (
            f"could not download {filename} from {url} ({reason}). "
            f"Fetch it on a machine with internet access and put it at {target}"
        )
        return DownloadError(message + (f", or {hint}" if hint else ""))

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total is not None else None
            received = 0
            bar = _progress_bar(total, filename) if progress else None
            try:
                with open(part, "wb") as out:
                    while True:
                        chunk = response.read(_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                if bar is not None:
                    bar.close()
    except (urllib.error.URLError, OSError, ValueError) as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", None) or err
        raise fail(str(reason)) from None
    if total is not None and received != total:
        part.unlink(missing_ok=True)
        raise fail(f"transfer interrupted after {received} of {total} bytes")
    os.replace(part, target)
    return target


# What a diffusers AutoencoderKL repository holds (the SD VAEs: `stabilityai/sd-vae-ft-mse`, `-ema`), and
# so what must be fetched to use one offline.
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
# One look at the hub before a download: long enough for a slow link to answer, short enough that an
# offline machine learns it at once instead of after huggingface_hub's retries.
HUB_PROBE_SECONDS = 3.0


def hf_program() -> str:
    """huggingface_hub's `hf` CLI (which replaced `huggingface-cli` in 0.34) as this installation runs it,
    printed so that it runs as shown (`.venv/bin/hf` when the environment is not activated)."""
    return shlex.join(script_words("hf") or ["hf"])


def hf_download_command(repo: str, files=VAE_FILES) -> str:
    """The command that puts `files` of `repo` into the Hugging Face cache."""
    return " ".join([hf_program(), "download", repo, *files])


def vae_fetch_advice(repo: str) -> str:
    """What to do about a VAE that is neither cached nor downloadable here, one message for every job
    (`extract`, `train`, `sample`, `sample-ddp`, the app, the notebook), as an `ArgumentError` template:
    "{vae:PATH}" is worded by the edge that shows it (--vae PATH on the command line, vae=PATH in Python)."""
    return (f"On a machine with internet access, `{template_text(hf_download_command(repo))}` puts it into the Hugging "
            "Face cache ($HF_HOME, else ~/.cache/huggingface; copy that folder to this machine), or pass {vae:PATH}, a "
            "local diffusers AutoencoderKL folder; small images (such as the 8x8 digits) need no VAE: {vae:pixels} "
            "trains and samples them in pixel space")


def hf_files_cached(repo: str, files=VAE_FILES) -> bool:
    """Whether every one of `files` of `repo` is in the local Hugging Face cache (no network used)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return all(isinstance(try_to_load_from_cache(repo, name), str) for name in files)


def hf_hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it answered.

    Offline mode (HF_HUB_OFFLINE) is read from the environment as well as from huggingface_hub, which
    reads it once at import. Otherwise the endpoint is asked once, for at most HUB_PROBE_SECONDS: any HTTP
    answer, an error status included, means it is reachable.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HUB_PROBE_SECONDS):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        return f"no answer from {constants.ENDPOINT}: {reason}"


def _progress_bar(total: int | None, name: str):
    from .progress import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {name}")


__all__ = [
    "OFFICIAL_CHECKPOINTS",
    "OFFICIAL_DIT_URL",
    "RAE_CACHE_SUBDIR",
    "RAE_FILES_URL",
    "VAE_FILES",
    "cache_dir",
    "download",
    "hf_download_command",
    "hf_program",
    "vae_fetch_advice",
    "hf_files_cached",
    "hf_hub_unreachable",
    "official_dit_name",
]
