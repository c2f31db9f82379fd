"""Stand-ins for an RAE latent space, for tests: a local RAE folder (`fastdit.rae.space`) holding the tiny
DINOv2-with-registers encoder, the tiny decoder and the statistics of the parity fixtures
(tests/fixtures/rae/README.md), built here with transformers."""

import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "rae"
GOLDEN = torch.load(FIXTURES / "rae_golden.pt", weights_only=True)
TINY = GOLDEN["rae_tiny"]
TINY_DECODER = {"hidden_size": 32, "depth": 2, "num_heads": 4, "mlp_size": 64, "patch_size": 4}
IMAGE_SIZE = 16  # 4x4 tokens of 4-px patches
LATENT_SHAPE = (16, 4, 4)


def write_tiny_rae_folder(folder: Path) -> str:
    """Write the tiny RAE folder (rae.json, encoder/, model.pt, stat.pt); returns its --vae name."""
    from safetensors.torch import save_file
    from transformers import Dinov2WithRegistersConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # config.json and model.safetensors as a hub repository holds them: the weights under the names
    # transformers 4 saved (the fixture's), which transformers 5 renames while loading.
    Dinov2WithRegistersConfig(**json.loads(TINY["encoder_config"])).save_pretrained(folder / "encoder")
    save_file({k: v.contiguous() for k, v in TINY["encoder_state"].items()}, str(folder / "encoder" / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copyfile(FIXTURES / "decoder_tiny_model.pt", folder / "model.pt")  # RAE's released layout
    torch.save(TINY["stats"], folder / "stat.pt")
    (folder / "rae.json").write_text(json.dumps({
        "encoder": "encoder", "encoder_input_size": TINY["encoder_input_size"], "decoder": TINY_DECODER,
        "decoder_weights": "model.pt", "stats": "stat.pt"}))
    return f"rae:{folder}"
