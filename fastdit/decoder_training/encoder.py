"""The frozen encoder a decoder is trained for, seen as one thing: images in [-1, 1] -> a token grid.

Two kinds, told apart by the spec:

* `rae:<variant>` / `rae:FOLDER`: RAE's encoder exactly as the RAE latent space reads it
  (`fastdit.rae.encoder`: DINOv2 with registers, its final LayerNorm without affine, images resized
  bicubically to the space's input size). A decoder trained on these tokens is a decoder of that space.
* anything `fastdit.encoders.load_encoder` takes (a named encoder, hf:<owner>/<repo>, NAME=FOLDER, a
  TorchScript file such as the digits demo's encoder): its patch tokens (N, T, D) laid out on their
  square grid. REPA's preprocessing, not RAE's: such a decoder reads these tokens, not the RAE space's.
  A TorchScript encoder's run folder becomes an RAE latent space of its own (`rae:RUN_FOLDER`).

`TokenEncoder(images) -> (N, D, g, g)` float32, without a gradient; `dim` (D), `grid` (g), `name`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError


@dataclass
class TokenEncoder:
    module: nn.Module  # frozen, on the training device
    name: str  # the spec, as given
    dim: int
    grid: int
    input_size: int  # the side the encoder resizes images to
    # For RAE's own encoder, the encoder an RAE folder's rae.json names (a name in fastdit.encoders.ENCODERS or
    # a folder): the RAE latent space can then pair it with the trained decoder. None for other encoders.
    rae_encoder: str | None = None
    # A TorchScript encoder's file: the run folder keeps a copy, which its rae.json names (the RAE latent
    # space reads TorchScript encoders too: `fastdit.rae.space`).
    torchscript_file: Path | None = None

    @property
    def is_rae(self) -> bool:
        return self.rae_encoder is not None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1 and self.is_rae:
            images = images.expand(-1, 3, -1, -1)  # gray as RGB with three equal channels
        tokens = self.module(images).float()
        if tokens.ndim == 3:  # (N, T, D) patch tokens, row-major -> (N, D, g, g)
            tokens = tokens.transpose(1, 2).reshape(len(tokens), self.dim, self.grid, self.grid)
        return tokens

    @property
    def identity(self) -> dict:
        """What a resumed run must find again: the spec and the token grid it makes."""
        return {"name": self.name, "dim": self.dim, "grid": self.grid}

    def to(self, device) -> "TokenEncoder":
        self.module.to(device)
        return self


def load_token_encoder(spec: str, device, *, resolution: int | None = None, progress: bool = True) -> TokenEncoder:
    """The encoder `spec` names (module docstring), frozen, on `device`."""
    spec = str(spec).strip()
    if spec.startswith("rae:"):
        from ..rae.encoder import load_rae_encoder
        from ..rae.space import _encoder_folder, describe

        described = describe(spec)
        module = load_rae_encoder(_encoder_folder(described.encoder, progress), described.encoder_input_size,
                                  described.encoder)
        module = module.to(device).eval().requires_grad_(False)
        return TokenEncoder(module, spec, module.dim, module.grid_size, described.encoder_input_size,
                            rae_encoder=described.encoder)
    from ..encoders import load_encoder

    encoder = load_encoder(spec, device, resolution=resolution, progress=progress)
    if encoder.grid * encoder.grid != encoder.num_tokens:
        raise UserError(f"{spec} makes {encoder.num_tokens} tokens, not a square grid; the decoder reads a square "
                        "token grid")
    from ..rae.space import is_torchscript_encoder

    file = Path(spec).expanduser() if is_torchscript_encoder(spec) and Path(spec).expanduser().is_file() else None
    return TokenEncoder(encoder, spec, encoder.dim, encoder.grid, encoder.resolution, torchscript_file=file)
