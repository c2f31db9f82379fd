"""What a decoder-training run hands on: the EMA decoder in RAE's key layout, the latent statistics, and
(for RAE's encoder) an RAE folder description that the RAE latent space loads as `rae:RUN_FOLDER`.

* `checkpoints/<step>-ema.safetensors`: the EMA decoder's state dict, keys exactly those of RAE's
  `GeneralDecoder` (what `fastdit.rae.space.load_decoder_weights` loads with strict=True; RAE itself
  reads it after `safetensors.torch.load_file`), float32; its metadata "fastdit_decoder" (JSON) records
  the decoder's shape, the encoder and the step.
* `latent-stats.pt`: {"mean", "var"}, each (C, h, w) float32: the per-element mean and population
  variance of the clean encoder tokens of every training image the run has seen (RAE's stat.pt).
* `rae.json` (RAE's encoder, or a TorchScript encoder, copied into the run folder as `encoder.pt`): the
  encoder, its input size, the images' channels, the decoder's shape, and the two files above, rewritten
  at every checkpoint to name the newest export. Then

      fastdit extract --vae rae:RUN_FOLDER --data-path IMAGES ...   # latents of this space
      fastdit train --features-path STORE ...                       # a diffusion model on them

  decode with the trained decoder. Other encoders (named ones such as CLIP, hf:...) get the safetensors
  and the statistics, but no rae.json: the RAE latent space reads DINOv2 with registers or TorchScript.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..io import atomic_path, atomic_torch_save, atomic_write_json
from ..rae.space import RAE_JSON
from ..rae.variants import STATS_EPS

EXPORT_METADATA_KEY = "fastdit_decoder"
STATS_FILE = "latent-stats.pt"


def export_decoder(ema_state: dict, path: Path, *, decoder_config, encoder: dict, step: int) -> None:
    """The EMA decoder's weights as safetensors at `path` (atomically)."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().float().contiguous().cpu() for key, value in ema_state.items()}
    shape = {k: getattr(decoder_config, k) for k in ("latent_dim", "hidden_size", "depth", "num_heads", "mlp_size",
                                                     "patch_size", "grid_size", "channels")}
    metadata = {EXPORT_METADATA_KEY: json.dumps({"decoder": shape, "encoder": encoder, "step": step,
                                                 "image_size": decoder_config.image_size,
                                                 "pixel_mean": list(decoder_config.pixel_mean),
                                                 "pixel_std": list(decoder_config.pixel_std)})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


TORCHSCRIPT_COPY = "encoder.pt"


def copy_encoder(source: Path, run_dir: Path) -> str:
    """The TorchScript encoder copied into the run folder (once: a resumed run checks it is the same
    encoder by its token shape), so that the folder is a latent space on its own; its name there."""
    import shutil

    target = run_dir / TORCHSCRIPT_COPY
    if not target.exists():
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    return TORCHSCRIPT_COPY


def write_statistics(run_dir: Path, mean: torch.Tensor, var: torch.Tensor) -> Path:
    path = run_dir / STATS_FILE
    atomic_torch_save({"mean": mean.cpu(), "var": var.cpu()}, path)
    return path


def write_rae_description(run_dir: Path, export: Path, *, encoder: str, encoder_input_size: int, decoder_config) -> Path:
    """`rae.json` in the run folder, naming the newest export and the statistics (paths relative to it)."""
    record = {
        "channels": decoder_config.channels,
        "encoder": encoder,
        "encoder_input_size": encoder_input_size,
        "decoder": {k: getattr(decoder_config, k) for k in ("hidden_size", "depth", "num_heads", "mlp_size", "patch_size")},
        "decoder_weights": os.path.relpath(export, run_dir),
        "stats": STATS_FILE,
        "eps": STATS_EPS,
    }
    path = run_dir / RAE_JSON
    atomic_write_json(record, path)
    return path
