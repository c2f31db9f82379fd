"""The pretrained files decoder training reads besides the encoder, where they come from, and how they load.

Three files, each fetched once into fastdit's cache by `fastdit.hub.download` (progress bar, `.part` file
renamed when complete; offline, one line naming the file, its address and where to put it):

  file                              cache folder   what it is (where RAE gets it)
  vgg16-397923af.pth                lpips/         torchvision's ImageNet VGG16, LPIPS's backbone (RAE's LPIPS calls
                                                   `torchvision.models.vgg16(pretrained=True)`, which fetches this file)
  vgg.pth                           lpips/         LPIPS's learned linear heads (Zhang et al. 2018), the copy that
                                                   taming-transformers serves and RAE's `disc/lpips_utils.py` downloads
  dino_vit_small_patch8_224.pth     rae/discs/     DINO ViT-S/8 (Caron et al. 2021), the frozen backbone of RAE's
                                                   discriminator (`configs/stage1/training/DINOv2-B_decXL.yaml`,
                                                   `gan.disc.arch.dino_ckpt_path`), from RAE's release repository

Each is a plain state dict read with `torch.load(weights_only=True)` (no code is unpickled) and loaded with
strict key and shape checks: a file in another layout is refused in one line naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..hub import download
from ..state_dicts import key_problems

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
LPIPS_LIN_URL = "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"
LPIPS_LIN_FILE = "vgg.pth"
LPIPS_SUBDIR = "lpips"
# RAE's release repository (the address `fastdit.rae.space` fetches the released decoders from).
DINO_DISC_URL = "https://huggingface.co/nyu-visionx/RAE-collections/resolve/main/discs/dino_vit_small_patch8_224.pth"
DINO_DISC_FILE = "dino_vit_small_patch8_224.pth"
DINO_DISC_SUBDIR = "rae/discs"


# What a run can do without each file (the offline message ends with it).
WITHOUT = {LPIPS_SUBDIR: "pass --perceptual-weight 0 to train without LPIPS",
           DINO_DISC_SUBDIR: "pass --disc-weight 0 to train without the discriminator"}


def fetch(url: str, filename: str, subdir: str, *, progress: bool = True) -> Path:
    """The cached copy of one of the files above, downloaded first when it is not there."""
    return download(url, filename, subdir=subdir, progress=progress, hint=WITHOUT.get(subdir, ""))


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A file's dict of tensors, read without unpickling code; a one-line UserError otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises many types; say which file did not read
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"cannot read the {what} {str(path)!r} ({type(err).__name__}: {reason}); delete it to "
                        "download it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"the {what} {str(path)!r} is not a state dict (a dict of tensors); delete it to download "
                        "it again")
    return state


def load_exactly(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """`module.load_state_dict(state, strict=True)`, with a one-line UserError naming the first missing,
    unexpected or misshapen key, and refusing non-finite values (a damaged file)."""
    problems = key_problems(module.state_dict(), state)
    if problems:
        raise UserError(f"the {what} {str(path)!r} does not fit ({problems}); delete it to download the "
                        "original file again")
    bad = [key for key, value in state.items() if not value.is_floating_point() or not torch.isfinite(value).all()]
    if bad:
        raise UserError(f"the {what} {str(path)!r} holds non-finite or non-float values in {bad[0]!r}; delete it to "
                        "download it again")
    module.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
