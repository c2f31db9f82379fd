"""`train --init-from`: a run that starts from released or trained weights (fine-tuning), as DiT users
fine-tune DiT-XL/2 on their own classes.

The source is an official model by name (`DiT-XL/2`, `SiT-XL/2`: the release at the run's image size,
downloaded once) or a file `fastdit sample --ckpt` takes (an export, a training checkpoint, whose EMA is
used, or a plain state dict). Weights only: the optimizer, the step and the data order start afresh,
and the run's EMA starts from the loaded weights.

What may differ from the source:
* the class count: the label table keeps the rows of the classes both have (class k to class k) and the
  null class of guidance; new classes keep their fresh initialisation (normal, std 0.02, as DiT's);
* the image size (the token grid): the sin-cos position table is a fixed function of the grid and is
  the new run's own, not loaded.
Everything else (width, depth, heads, patch, channels, block options, learned variance) must match.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..hub import OFFICIAL_CHECKPOINTS, official_dit_name

OFFICIAL_MODELS = sorted({model for model, _ in OFFICIAL_CHECKPOINTS.values()})
# DiTConfig fields that decide the shapes of the weights (besides the class count and the grid).
SHAPE_FIELDS = ("patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "learn_sigma",
                "norm", "mlp", "rope", "qk_norm", "time_gap_embedding", "guidance_embedding")
LABEL_TABLE = "y_embedder.embedding_table.weight"
GRID_TABLE = "pos_embed"


def source_of(spec: str, image_size: int) -> str:
    """The file or official name `load_model` takes for `--init-from spec` at `image_size`."""
    if spec in OFFICIAL_MODELS:
        name = official_dit_name(spec, image_size)
        if name not in OFFICIAL_CHECKPOINTS:
            sizes = sorted(size for model, size in OFFICIAL_CHECKPOINTS.values() if model == spec)
            raise UserError(f"--init-from {spec} is released at {', '.join(map(str, sizes))} px, not {image_size}; "
                            f"train at --image-size {sizes[0]}, or give a checkpoint file")
        return name
    return spec


@torch.no_grad()
def load_initial_weights(model: torch.nn.Module, spec: str, image_size: int) -> str:
    """Copy the weights of `spec` into the freshly built `model` (module docstring); returns a line for the
    log saying what was loaded."""
    from ..checkpoint import load_model

    donor, info = load_model(source_of(spec, image_size), device="cpu")
    source, loaded = model.config, donor.config
    different = [f"{name} {getattr(loaded, name)!r} (this run: {getattr(source, name)!r})"
                 for name in SHAPE_FIELDS if getattr(loaded, name) != getattr(source, name)]
    if different:
        raise UserError(f"--init-from {spec} is another architecture: {'; '.join(different)}; give weights of this "
                        f"model, or change the model flags to match them")
    weights, own = donor.state_dict(), model.state_dict()
    copied = {key: value for key, value in weights.items() if key not in (LABEL_TABLE, GRID_TABLE)}
    missing = sorted(set(own) - set(copied) - {LABEL_TABLE, GRID_TABLE})
    if missing or set(copied) - set(own):
        raise UserError(f"--init-from {spec} does not hold this model's weights (e.g. {(missing or sorted(set(copied) - set(own)))[0]})")
    table, old = own[LABEL_TABLE].clone(), weights[LABEL_TABLE]
    common = min(loaded.num_classes, source.num_classes)
    table[:common] = old[:common]
    if loaded.class_dropout_prob > 0 and source.class_dropout_prob > 0:  # the null class is the last row of both
        table[-1] = old[-1]
    model.load_state_dict({**own, **copied, LABEL_TABLE: table})
    classes = (f"{common} of its {loaded.num_classes} classes kept" if loaded.num_classes != source.num_classes
               else f"its {common} classes")
    grid = f", position table of the new {source.grid_size}x{source.grid_size} grid" if loaded.grid_size != source.grid_size else ""
    trained_for = f", trained for {info.objective.name}" if info.objective is not None else ""
    return f"initial weights from {spec} ({classes}{grid}{trained_for}); optimizer and step start afresh"
