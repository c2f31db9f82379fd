"""Reading and writing model weights in every format fastdit meets.

Formats read by `load_model`:
* an official DiT release (`DiT-XL-2-256x256.pt`): a plain state dict of EMA weights;
* an official DiT training checkpoint: `{"model", "ema", "opt", "args"}`;
* a fastdit training checkpoint (`fastdit.train`): full training state plus the run config;
* a fastdit export (`.safetensors` of EMA weights, with the model config in its metadata);
* any plain state dict in `.pt`/`.pth`/`.safetensors`.

Every `.pt` is read with `torch.load(weights_only=True)`: no pickled code runs. Keys never carry
`module.` (DDP) or `_orig_mod.` (torch.compile) prefixes when we write them, and are stripped when we
read them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .errors import DownloadError, FetchError, UserError, template_text
from . import hub
from .hub import OFFICIAL_CHECKPOINTS, download, official_objective
from .io import atomic_path, check_regular_file
from .latents import OFFICIAL_VAES, PIXEL_SPACE_NAMES, is_rae_name, latent_side
from .state_dicts import check_weight_values, describe_mismatch
from .model_info import LatentInfo, ModelInfo, parse_recorded_json
from .models import DiTConfig, build_from_config, config_from_name, preset_of
from .models.dit import swiglu_hidden
from .models.presets import HEADS, SIZES
from .objectives import OBJECTIVES, build_objective
from .sampling.recipe import training_recipe

TRAIN_FORMAT = "fastdit.train"
EXPORT_FORMAT = "fastdit.export"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def read_checkpoint(path: str | os.PathLike, use_ema: bool = True) -> tuple[dict, dict | None]:
    """(state dict of the weights to use, stored fastdit metadata or None); EMA weights by default."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist; check the path (or pass an official name such as DiT-XL-2-256x256.pt)")
    if path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} is a folder; pass a .pt or .safetensors file")
    check_regular_file(path, "checkpoint")  # a named pipe would block the read below forever
    if path.suffix == ".safetensors" or _is_safetensors(path):
        return _read_safetensors(path)
    try:
        # Official training checkpoints pickle their argparse Namespace: allow that one plain class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean "not a whole checkpoint"
        raise UserError(
            f"cannot read checkpoint {str(path)!r}: it is truncated, corrupt or not a PyTorch checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {str(path)!r} holds a {type(data).__name__}, not a state dict")
    metadata = None
    if data.get("format") == TRAIN_FORMAT:
        metadata = data.get("model_info")
        state = data["ema"] if use_ema else data["model"]
    elif "ema" in data and isinstance(data["ema"], dict):  # official DiT train.py checkpoint
        state = data["ema"] if use_ema else data["model"]
    elif "model" in data and isinstance(data["model"], dict) and "pos_embed" not in data:
        state = data["model"]
    else:
        state = data
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {str(path)!r} is not a model state dict (some entries are not tensors)")
    return strip_wrapper_prefixes(state), metadata


def _is_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict, dict | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read {str(path)!r}: truncated or not a safetensors file ({err})") from None
    metadata = parse_recorded_json(raw_meta["model_info"], str(path)) if "model_info" in raw_meta else None
    return strip_wrapper_prefixes(state), metadata


def is_ddt_layout(state_dict: dict) -> bool:
    """Whether the weights are a DiT^DH's, in RAE's layout (a body and a head embedding of their own)."""
    return "s_embedder.proj.weight" in state_dict


def _shape_fields(state_dict: dict) -> dict:
    """The config fields that weight shapes and key names determine (everything but depth, width, heads).

    Of the block options, the MLP kind shows in its key names (`fc1`/`fc2` or SwiGLU's `fc_in`/`fc_out`)
    and qk_norm in its norms' keys, whose bias (LayerNorm has one, RMSNorm not) also tells the norm kind.
    RoPE (its tables are not saved) and rmsnorm without qk_norm (the block norms have no weights) leave
    no trace: a plain state dict reads as without them, and only a file that records its config (a fastdit
    export or training checkpoint) restores them. A DiT^DH (RAE's layout) shows them all: `_ddt_shape_fields`."""
    if is_ddt_layout(state_dict):
        return _ddt_shape_fields(state_dict)
    try:
        num_tokens, hidden = state_dict["pos_embed"].shape[1:]
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
        final = state_dict["final_layer.linear.weight"].shape[0]
        if "blocks.0.mlp.fc_in.weight" in state_dict:  # SwiGLU: (2 w, D), gate and value fused
            fused_rows = state_dict["blocks.0.mlp.fc_in.weight"].shape[0]
            mlp = dict(mlp="swiglu", mlp_ratio=_swiglu_mlp_ratio(fused_rows, hidden))
        else:
            mlp = dict(mlp="gelu", mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden)
    except KeyError as err:
        raise UserError(f"not a DiT state dict: key {err.args[0]!r} is missing") from None
    patch, in_channels = proj.shape[-1], proj.shape[1]
    qk_norm = "blocks.0.attn.q_norm.weight" in state_dict
    norm = {"norm": "layernorm" if "blocks.0.attn.q_norm.bias" in state_dict else "rmsnorm"} if qk_norm else {}
    # Without metadata we assume a null-class row is present (official releases: 1001 rows for 1000 classes).
    return dict(
        input_size=int(round(num_tokens**0.5)) * patch,
        patch_size=patch,
        in_channels=in_channels,
        num_classes=rows - 1,
        learn_sigma=final // (patch * patch) == 2 * in_channels,
        **mlp,
        qk_norm=qk_norm,
        **norm,
        time_gap_embedding="gap_embedder.mlp.0.weight" in state_dict,  # MeanFlow's second time input
        guidance_embedding="guidance_embedder.mlp.0.weight" in state_dict,  # improved MeanFlow's guidance input
    )


def _ddt_shape_fields(state_dict: dict) -> dict:
    """`_shape_fields` of a DiT^DH in RAE's layout (`fastdit.models.ddt`): its keys show every block option
    (the RMSNorm gains, the QK-norms, SwiGLU's `w12`, the saved RoPE tables) and the head's width; the
    body's depth is the blocks of the body's width (`_ddt_depths`)."""
    try:
        num_tokens, hidden = state_dict["pos_embed"].shape[1:]
        proj = state_dict["s_embedder.proj.weight"]  # (D, C, p, p)
        head_hidden = state_dict["x_embedder.proj.weight"].shape[0]
        rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
        final = state_dict["final_layer.linear.weight"].shape[0]
        if "blocks.0.mlp.w12.weight" in state_dict:  # SwiGLU of width int(2/3 · ratio · D), gate and value fused
            fused_rows = state_dict["blocks.0.mlp.w12.weight"].shape[0]
            ratios = [r for r in (4.0, 1.5 * (fused_rows // 2) / hidden) if int(2 / 3 * int(hidden * r)) * 2 == fused_rows]
            if not ratios:
                raise UserError(f"blocks.0.mlp.w12.weight has {fused_rows} rows, which no mlp_ratio gives RAE's SwiGLU; "
                                "the file is not a DiT^DH state dict")
            mlp = dict(mlp="swiglu", mlp_ratio=ratios[0])
        else:
            mlp = dict(mlp="gelu", mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden)
    except KeyError as err:
        raise UserError(f"not a DiT^DH state dict: key {err.args[0]!r} is missing") from None
    patch, in_channels = proj.shape[-1], proj.shape[1]
    _, head_depth = _ddt_depths(state_dict, hidden)
    return dict(
        input_size=int(round(num_tokens**0.5)) * patch,
        patch_size=patch,
        in_channels=in_channels,
        num_classes=rows - 1,
        learn_sigma=final // (patch * patch) == 2 * in_channels,
        **mlp,
        norm="rmsnorm" if "blocks.0.norm1.weight" in state_dict else "layernorm",
        rope=True,
        qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
        head_depth=head_depth,
        head_hidden_size=int(head_hidden),
    )


def _ddt_depths(state_dict: dict, hidden: int) -> tuple[int, int]:
    """(body depth, head depth) of a DiT^DH state dict: RAE lists the body's blocks first, then the head's,
    which differ in width; a head as wide as the body leaves the split unknown (a UserError)."""
    widths = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "blocks" and parts[1:2] != [] and parts[1].isdigit() and parts[2:] == ["attn", "qkv", "weight"]:
            widths[int(parts[1])] = value.shape[-1]
    if sorted(widths) != list(range(len(widths))) or not widths:
        raise UserError("not a DiT^DH state dict: its blocks are not numbered 0, 1, ... each with an attention")
    depth = sum(1 for width in widths.values() if width == hidden)
    if depth == len(widths) or any(widths[i] != hidden for i in range(depth)):
        raise UserError(f"cannot tell where the DDT head starts in these {len(widths)} blocks (the head is as wide as "
                        f"the body, {hidden}): pass --model with a DiT^DH preset, or use a checkpoint that records "
                        f"its config")
    return depth, len(widths) - depth


def _swiglu_mlp_ratio(fused_rows: int, hidden: int) -> float:
    """An `mlp_ratio` that gives a SwiGLU MLP `fused_rows` / 2 wide: `swiglu_hidden` rounds, so several
    do; 4.0 (every preset) when it is one of them, else the GELU width that the SwiGLU width is 2/3 of."""
    width = fused_rows // 2
    for ratio in (4.0, 1.5 * width / hidden):
        if fused_rows % 2 == 0 and swiglu_hidden(int(hidden * ratio)) == width:
            return ratio
    raise UserError(
        f"blocks.0.mlp.fc_in.weight has {fused_rows} rows, which no mlp_ratio gives a fastdit SwiGLU MLP (twice "
        f"a multiple of 8); the file is not a fastdit DiT state dict"
    )


def infer_config(state_dict: dict) -> DiTConfig:
    """A `DiTConfig` from weight shapes; heads come from the preset with the same depth and width (and,
    for a DiT^DH's head, the preset head of that depth and width)."""
    fields = _shape_fields(state_dict)
    hidden = state_dict["pos_embed"].shape[-1]
    depth = _file_depth(state_dict, hidden)
    heads = next((h for d, w, h in SIZES.values() if d == depth and w == hidden), None)
    if heads is None:
        raise UserError(
            f"cannot tell the number of attention heads of a DiT with depth {depth} and width {hidden}; "
            f"pass --model with a preset name, or use a checkpoint that records its config"
        )
    if fields.get("head_depth"):
        head = (fields["head_depth"], fields["head_hidden_size"])
        fields["head_num_heads"] = next((h for d, w, h in HEADS.values() if (d, w) == head), None)
        if fields["head_num_heads"] is None:
            raise UserError(f"cannot tell the number of attention heads of a DDT head of depth {head[0]} and width "
                            f"{head[1]}; pass --model with a DiT^DH preset, or use a checkpoint that records its config")
    return DiTConfig(hidden_size=hidden, depth=depth, num_heads=heads, **fields)


def _file_depth(state_dict: dict, hidden: int) -> int:
    """The DiT's blocks (a DiT^DH's body's) in a state dict."""
    if is_ddt_layout(state_dict):
        return _ddt_depths(state_dict, hidden)[0]
    return len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})


def _file_shape(state_dict: dict) -> tuple[dict, int, int] | None:
    """(`_shape_fields`, width, depth) of the weights in a file, or None for a file that is no DiT
    state dict (then the key comparison says what is missing)."""
    try:
        found = _shape_fields(state_dict)
        width = int(state_dict["pos_embed"].shape[-1])
        depth = _file_depth(state_dict, width)
    except (UserError, ValueError, IndexError):  # a missing key, or a tensor of the wrong rank
        return None
    return found, width, depth


def _summary(config: DiTConfig, state_dict: dict) -> str:
    """'the file holds patch 8, width 128, depth 6; the model has patch 4, ...', or '' when the file
    is no DiT state dict."""
    shape = _file_shape(state_dict)
    if shape is None:
        return ""
    found, width, depth = shape
    file_head = f", a DDT head of {found['head_depth']} x {found['head_hidden_size']}" if found.get("head_depth") else ""
    model_head = f", a DDT head of {config.head_depth} x {config.head_hidden_size}" if config.has_head else ""
    return (
        f"the file holds patch {found['patch_size']}, width {width}, depth {depth}{file_head}; "
        f"the model has patch {config.patch_size}, width {config.hidden_size}, depth {config.depth}{model_head}. "
    )


def _mismatch_error(expected_state: dict, config: DiTConfig, state_dict: dict, source: str) -> UserError | None:
    problem = describe_mismatch(expected_state, state_dict)
    if not problem:
        return None
    return UserError(
        f"checkpoint {source!r} does not fit this model ({preset_of(config) or 'custom DiT'}): "
        f"{_summary(config, state_dict)}{problem}"
    )


def check_fits_before_building(config: DiTConfig, state_dict: dict, source: str, *, recorded: bool) -> None:
    """Refuse a config (`recorded` in the file, or given by the caller) that the file's tensors do not
    match, before a single weight is allocated: a 7 MB export whose metadata claims depth 400 and width
    2048 is one line, not a 23 GB model built first.

    Depth, width and input size, the knobs that make a model big, are compared first, from shapes and
    key names alone: even on the meta device a DiT costs time per block and computes its sin-cos
    position table (tokens x width) on the CPU. With those equal, a skeleton on the meta device
    (shapes, no storage) is compared key by key, so a wrong patch size, MLP ratio or class count is
    named key by key too."""
    shape = _file_shape(state_dict)
    if shape is not None:
        found, width, depth = shape
        file_head = (found.get("head_depth", 0), found.get("head_hidden_size", 0))
        if (depth, width, found["input_size"], file_head) != (config.depth, config.hidden_size, config.input_size,
                                                              (config.head_depth, config.head_hidden_size)):
            sizes = ("" if found["input_size"] == config.input_size else
                     f"The file's input size is {found['input_size']}, the model's {config.input_size}. ")
            why = ("The config recorded in the file disagrees with its weights: the file is damaged or its "
                   "metadata was edited; export it again" if recorded else
                   "Pass the --model and --image-size it was trained with, or leave them out to read them from the weights")
            raise UserError(f"checkpoint {source!r} does not fit this model ({preset_of(config) or 'custom DiT'}): "
                            f"{_summary(config, state_dict)}{sizes}{why}")
    with torch.device("meta"):
        skeleton = build_from_config(config)
    error = _mismatch_error(skeleton.state_dict(), config, state_dict, source)
    if error is not None:
        raise error


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    error = _mismatch_error(model.state_dict(), model.config, state_dict, source)
    if error is not None:
        raise error
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------
# the one loader
# ----------------------------------------------------------------------------------------------


def resolve_official(name: str, vae: str | None = None) -> Path | None:
    """Path of an official release file, downloading it on first use; None if `name` is not one.

    Every release works on SD-VAE latents (`vae`, else "mse"): when that VAE is not cached either, the
    offline message names it too, so that one trip to a connected machine fetches both.
    """
    if Path(name).name not in OFFICIAL_CHECKPOINTS or Path(name).exists():
        return None
    filename = Path(name).name
    subdir = {"flow": "sit", "rae": "rae"}.get(official_objective(OFFICIAL_CHECKPOINTS[filename][0]), "dit")
    try:
        return download(hub.official_url(filename), filename, subdir=subdir)
    except DownloadError as err:
        # The advice names the arguments each edge words its own way: `--ckpt PATH`, the Checkpoint field,
        # `source=PATH` in Python (`ArgumentError`).
        template, fields = template_text(str(err)) + ", or load a local copy: {source:PATH}", ["source"]
        vae_repo = OFFICIAL_VAES.get(vae or "mse", vae)
        if vae_repo not in PIXEL_SPACE_NAMES and not Path(vae_repo).is_dir() and not hub.hf_files_cached(vae_repo):
            template += template_text(f". Sampling it also needs the VAE {vae_repo}, which is not in the Hugging Face "
                                      "cache either. ") + hub.vae_fetch_advice(vae_repo)
            fields.append("vae")
        raise FetchError(template, *fields) from None


def load_model(
    source: str | os.PathLike,
    *,
    model_name: str | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    vae: str | None = None,
    objective: str | None = None,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, ModelInfo]:
    """A ready (eval-mode) model (a `DiT`, or a `DiTDH`) and what it is, from an official name, a local
    file or a checkpoint.

    `model_name`, `image_size` and `num_classes` are needed only for plain state dicts whose config
    the file does not record (they are checked against the weights either way); the block options are
    read from the weights, except RoPE and RMSNorm without qk_norm, which leave none (`_shape_fields`). `vae` names the VAE
    of a plain state dict, or is "pixels" for one trained on pixels (its channel count is read from the
    patch embedding's weight). `objective` (a registered name: "ddpm", "flow", "x-pred") is what a plain state dict predicts:
    files that record it, and the official releases, know it already (a different one is refused).
    """
    source = str(source)
    pixels = vae in PIXEL_SPACE_NAMES
    official = resolve_official(source, vae=vae)
    if official is not None and pixels:
        raise UserError(f"{Path(source).name} works on SD-VAE latents, not pixels; drop --vae {vae}")
    if official is not None:
        model_name, official_size = OFFICIAL_CHECKPOINTS[Path(source).name]
        if image_size not in (None, official_size):
            raise UserError(f"{Path(source).name} is a {official_size}x{official_size} model; use --image-size {official_size}")
        image_size = official_size
        num_classes = num_classes or 1000
        path = official
    else:
        path = Path(source)
    state, metadata = read_checkpoint(path, use_ema=use_ema)
    check_weight_values(state, source)
    release = OFFICIAL_CHECKPOINTS.get(Path(source).name)  # also a local copy of a release
    known_objective = official_objective(release[0]) if release else None

    if metadata is not None:
        info = ModelInfo.from_dict(metadata, source=source)
        known_objective = info.objective.name
        if vae is not None and (pixels != (info.latent.kind == "pixels") or is_rae_name(vae) != (info.latent.kind == "rae")):
            trained_on = {"pixels": "pixels", "rae": f"the RAE latent space {info.latent.vae!r}"}.get(
                info.latent.kind, f"the latents of the VAE {info.latent.vae!r}")
            raise UserError(f"checkpoint {source!r} records that it works on {trained_on}; drop --vae {vae}")
        if model_name is not None:
            wanted = config_from_name(model_name)  # also rejects unknown names
            if preset_of(info.config) != preset_of(wanted):
                raise UserError(
                    f"checkpoint {source!r} holds a {preset_of(info.config) or 'custom DiT'}, not {model_name}; "
                    f"drop --model (the checkpoint records its architecture)"
                )
    else:
        latent = LatentInfo(kind="pixels", vae=None, scale_factor=1.0) if pixels else LatentInfo(kind="vae", vae=vae or "mse")
        if is_rae_name(vae):
            from .rae.space import describe

            spec = describe(vae)
            latent = LatentInfo(kind="rae", vae=spec.name, scale_factor=1.0, downsample_factor=spec.downsample)
        # RAE's DiT^DH (its layout): trained in RAE latents, whose tokens per side follow the representation
        # encoder's patches, not the SD VAE's factor 8; the file's own grid is the model's.
        rae_layout = is_ddt_layout(state) and not pixels
        if model_name is None:
            config = infer_config(state)
        else:
            fields = _shape_fields(state) if "pos_embed" in state else {}
            for name in ("patch_size", "mlp_ratio", "head_depth", "head_hidden_size"):  # the preset's, compared below
                fields.pop(name, None)
            if image_size is not None and not rae_layout:
                fields["input_size"] = latent_side(image_size, latent.downsample)
            if num_classes is not None:
                fields["num_classes"] = num_classes
            config = config_from_name(model_name, **fields)
        # A file in RAE's layout is RAE's model (its `rae` objective) unless told otherwise; a release
        # samples as RAE's configs do (Euler over 50 points, its time shift, unguided).
        trained_for = build_objective(known_objective or objective or ("rae" if is_ddt_layout(state) else "ddpm"))
        recipe = None
        if trained_for.name == "rae":
            recipe = training_recipe(trained_for, conditional=config.class_dropout_prob > 0, cfg_scale=1.0,
                                     input_shape=(config.in_channels, config.input_size, config.input_size))
        if rae_layout and vae is None:
            # RAE's releases record no latent space; their token grid says which of RAE's DINOv2-B spaces
            # they were trained in (16x16 at 256 px, 32x32 at 512: fastdit.rae.variants).
            released = released_rae_space(config.input_size, config.in_channels)
            if released is not None:
                from .rae.space import describe

                spec = describe(released)
                latent = LatentInfo(kind="rae", vae=spec.name, scale_factor=1.0, downsample_factor=spec.downsample)
        info = ModelInfo(config=config, latent=latent, source=source, objective=trained_for, sampling=recipe)
        if rae_layout and latent.kind != "rae":
            image_size = None  # its pixels per token are the latent space's, which the file does not say
    if objective is not None and known_objective not in (None, objective):
        raise UserError(f"{source!r} holds a {known_objective} model, not {objective}; drop --objective")
    if vae is not None and info.latent.kind in ("vae", "rae"):
        info.latent.vae = vae
    if image_size is not None and info.image_size != image_size:
        raise UserError(
            f"checkpoint {source!r} was trained at image size {info.image_size}; use --image-size {info.image_size}"
        )
    if num_classes is not None and num_classes != info.config.num_classes:
        raise UserError(
            f"checkpoint {source!r} has {info.config.num_classes} classes, not {num_classes}; "
            f"use --num-classes {info.config.num_classes}"
        )
    check_fits_before_building(info.config, state, source, recorded=metadata is not None)
    check_network_fits(info, source)
    model = build_from_config(info.config)
    load_state_dict_strict(model, state, source)
    return model.to(device).eval(), info


def released_rae_space(grid: int, channels: int) -> str | None:
    """The released RAE latent space ("rae:<variant>") whose latents are (channels, grid, grid), if one is."""
    from .rae.variants import RAE_VARIANTS

    for name, variant in RAE_VARIANTS.items():
        if (variant.latent_dim, variant.grid_size) == (channels, grid):
            return "rae:" + name
    return None


def load_guidance_model(source: str | os.PathLike, info: ModelInfo, *, vae: str | None = None,
                        device: str | torch.device = "cpu") -> torch.nn.Module:
    """The weaker model AutoGuidance guides the model described by `info` with (Karras et al. 2024), loaded
    as `load_model` loads any (`vae` as given for the model), in eval mode; a one-line UserError when it
    does not fit: another latent space, input shape or class count (its output would mean something
    else), or another objective (its output is another quantity)."""
    guide, guide_info = load_model(source, vae=vae, device=device)
    where = f"the guidance model {str(source)!r} does not fit the model {info.source!r}"
    fix = "AutoGuidance needs a weaker model of the same task: the same latent space, classes and objective"
    mine, theirs = info.config, guide_info.config
    if guide_info.latent != info.latent:
        raise UserError(f"{where}: it works on {_latent_words(guide_info.latent)}, the model on "
                        f"{_latent_words(info.latent)}; {fix}")
    if (theirs.in_channels, theirs.input_size) != (mine.in_channels, mine.input_size):
        raise UserError(f"{where}: its inputs are {theirs.in_channels}x{theirs.input_size}x{theirs.input_size}, the "
                        f"model's {mine.in_channels}x{mine.input_size}x{mine.input_size}; {fix}")
    if theirs.num_classes != mine.num_classes:
        raise UserError(f"{where}: it has {theirs.num_classes} classes, the model {mine.num_classes}; {fix}")
    if _output_kind(guide_info.objective) != _output_kind(info.objective):
        raise UserError(f"{where}: it is a {_objective_words(guide_info.objective)} model, the model a "
                        f"{_objective_words(info.objective)} one; {fix}")
    return guide


def _output_kind(objective) -> tuple:
    """What a network's output is and on which clock: the objective, and the path and prediction of
    those that have several (its training draws do not matter to guidance)."""
    path = getattr(objective, "interpolant", None)
    return objective.name, getattr(path, "name", None), getattr(objective, "prediction", None)


def _objective_words(objective) -> str:
    name, path, prediction = _output_kind(objective)
    return name if path is None else f"{name} ({path} path, {prediction})"


def _latent_words(latent: LatentInfo) -> str:
    return "pixels" if latent.kind == "pixels" else f"the latents of {latent.vae!r} (scale {latent.scale_factor:g})"


def check_network_fits(info: ModelInfo, source: str) -> None:
    """The network has what its objective needs (`Objective.network_options`) and nothing another
    objective needs that this one would not feed (a MeanFlow network's gap, read as a flow model), and
    a time embedding the objective's time fits (`Objective.check_network`)."""
    try:
        info.objective.check_network(info.config)
    except UserError as err:
        raise UserError(f"{source!r}: {err}") from None
    fields = {name for cls in OBJECTIVES.values() for name in cls.network_options}
    for name in sorted(fields):
        wanted = info.objective.network().get(name, DiTConfig.__dataclass_fields__[name].default)
        found = getattr(info.config, name)
        if found != wanted:
            users = [n for n, cls in OBJECTIVES.items() if cls.network_options.get(name) == found]
            hint = f"pass --objective {users[0]}" if users else f"it is no {info.objective.name} network"
            raise UserError(f"{source!r} holds a network with {name}={found}, which a {info.objective.name} model "
                            f"does not have ({name}={wanted}); {hint}")


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def export_weights(model_or_state, info: ModelInfo, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write EMA (or any) weights as `.safetensors` with the model config in the metadata, atomically.
    `extra` adds JSON-encoded metadata entries beside it (a post-hoc EMA snapshot's step and σ_rel);
    loaders that do not know them ignore them."""
    from safetensors.torch import save_file

    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    state = {k: v.detach().to("cpu").contiguous() for k, v in strip_wrapper_prefixes(state).items()}
    metadata = {"format": EXPORT_FORMAT, "model_info": json.dumps(info.to_dict()),
                **{key: json.dumps(value) for key, value in (extra or {}).items()}}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path
