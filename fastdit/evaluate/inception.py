"""Inception-v3 as the ADM evaluator sees it: the TF graph of 2015-12-05, in plain PyTorch.

FID, sFID, IS and precision/recall are only comparable with published numbers when they are computed
with *this* network: the 2015 TensorFlow graph (`classify_image_graph_def.pb`) that the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`) runs. Its weights were converted to PyTorch by
pytorch-fid and torch-fidelity; both files use torchvision's parameter names, which are therefore the
names below (`Conv2d_1a_3x3.conv.weight`, `Mixed_6d.branch1x1.bn.running_var`, `fc.weight`, ...).

The graph differs from torchvision's Inception-v3 in three places (the "FID variant" of the blocks):
  * average pools inside the blocks ignore the zero padding (TF `AvgPool` with SAME padding);
  * the last block (`Mixed_7c`, TF `mixed_10`) max-pools its pool branch instead of averaging;
  * the classifier has 1008 classes, and the graph resizes its input itself, with TF1 bilinear
    semantics, before normalising it with (x - 128) / 128.

What the evaluator reads out of the graph (TF tensor -> here):
  * `pool_3:0`       -> `pool`    (N, 2048): global average of `Mixed_7c`; FID and precision/recall;
  * `mixed_6/conv:0` -> `spatial` (N, 7*17*17): the first 7 channels of `Mixed_6d.branch1x1` after
    its ReLU, flattened in TF's NHWC order so that precomputed `mu_s`/`sigma_s` line up; sFID;
  * `softmax/logits/MatMul` -> `logits` (N, 1008): `pool @ fc.weight.T` *without* the bias, which
    is how ADM builds the softmax for the Inception Score.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..state_dicts import describe_mismatch

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE  # 2023

# The two published conversions of the same TF weights (release assets on GitHub). They share the
# torchvision key names; older files may lack BatchNorm's `num_batches_tracked`, which is unused here.
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
TORCH_FIDELITY_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
DEFAULT_WEIGHTS_URL = PYTORCH_FID_URL
WEIGHTS_HINT = "pass --inception-weights PATH (pytorch-fid's or torch-fidelity's inception-2015-12-05 .pth)"


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (TF eps 1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME-padded AvgPool divides by the number of real pixels, not by 9.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (TF mixed, mixed_1, mixed_2); 35x35."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """Mixed_6a (TF mixed_3): 35x35 -> 17x17."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (TF mixed_4..mixed_7); 17x17 with factorised 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four branch outputs; the first is TF's `mixed_N/conv` (used for sFID in Mixed_6d)."""
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return [self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """Mixed_7a (TF mixed_8): 17x17 -> 8x8."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    """Mixed_7b / Mixed_7c (TF mixed_9 / mixed_10); 8x8.

    The TF graph average-pools the pool branch of mixed_9 but *max*-pools it in mixed_10
    (pytorch-fid's FIDInceptionE_1 / FIDInceptionE_2); `max_pool` selects the latter.
    """

    def __init__(self, in_channels: int, *, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


@dataclass
class InceptionOutputs:
    pool: torch.Tensor  # (N, 2048)  pool_3
    spatial: torch.Tensor  # (N, 2023)  mixed_6/conv[..., :7], NHWC-flattened
    logits: torch.Tensor  # (N, 1008)  pool_3 @ W (no bias), as ADM's softmax graph


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize with TF1 `ResizeBilinear` semantics (align_corners=False, no half-pixel centers).

    TF1 samples output pixel i at input coordinate i * (in / out), computed in float32, and clamps the
    upper neighbour at the border. This is *not* `F.interpolate(..., align_corners=False)`, which
    uses half-pixel centres (i + 0.5) * scale - 0.5; the difference shifts FID noticeably.
    The lerps are done in TF's order (horizontal on both rows, then vertical) so the result matches
    the graph bit for bit on CPU. (N, C, H, W) float -> (N, C, size, size).
    """
    _, _, in_h, in_w = images.shape
    device = images.device

    def sample_points(in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
        coords = torch.arange(size, dtype=torch.float32) * scale
        lower = coords.floor().long()
        upper = (lower + 1).clamp(max=in_size - 1)
        frac = coords - lower.float()
        return lower.to(device), upper.to(device), frac.to(device=device, dtype=images.dtype)

    x_lo, x_hi, x_frac = sample_points(in_w)
    y_lo, y_hi, y_frac = sample_points(in_h)
    left, right = images[..., x_lo], images[..., x_hi]  # (N, C, H, size)
    rows = left + (right - left) * x_frac
    top, bottom = rows[..., y_lo, :], rows[..., y_hi, :]  # (N, C, size, size)
    return top + (bottom - top) * y_frac[:, None]


class InceptionV3(nn.Module):
    """The FID Inception-v3: uint8 images of any size in, `InceptionOutputs` out."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        """images: (N, 3, H, W), uint8 or float in [0, 255]."""
        x = images.to(torch.float32)
        x = resize_bilinear_tf1(x, INPUT_SIZE)
        x = (x - 128) / 128  # the graph's Sub(128), Mul(1/128); /128 is exact in binary floating point
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17) = mixed_6/conv[..., :7]
        x = self.Mixed_6e(torch.cat(branches, 1))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048) = pool_3
        return InceptionOutputs(
            pool=pool,
            spatial=spatial.permute(0, 2, 3, 1).flatten(1),  # TF flattens NHWC
            logits=pool @ self.fc.weight.T,
        )


def _normalise_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or one wrapped in {"state_dict": ...}; drop prefixes and unused keys."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{source} is not an Inception state dict; {WEIGHTS_HINT}")
    state = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.endswith("num_batches_tracked") or key.startswith("AuxLogits."):
            continue  # BatchNorm bookkeeping / torchvision's auxiliary head: not part of the graph
        state[key] = value
    return state


def load_inception_weights(model: InceptionV3, state: dict, source: str = "the weights") -> InceptionV3:
    """Load either published layout into `model`; a missing or misshapen tensor is a UserError."""
    state = _normalise_state_dict(state, source)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    problem = describe_mismatch(expected, state, limit=2)
    if problem:
        raise UserError(f"{source} is not the FID Inception-v3 (2015-12-05): {problem}; {WEIGHTS_HINT}")
    model.load_state_dict(state, strict=False)
    return model


def resolve_weights_path(weights_path: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """A local weights file, or the cached download of pytorch-fid's release asset."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise UserError(f"Inception weights not found: {str(path)!r}; {WEIGHTS_HINT}")
        return path
    from ..hub import download

    return download(
        DEFAULT_WEIGHTS_URL, Path(DEFAULT_WEIGHTS_URL).name, subdir="inception", progress=progress, hint=WEIGHTS_HINT
    )


def load_inception(
    weights_path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu", progress: bool = True
) -> InceptionV3:
    """The FID Inception in eval mode with frozen weights (downloaded on first use unless a path is given)."""
    path = resolve_weights_path(weights_path, progress=progress)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which file and how to fix it
        raise UserError(f"cannot read Inception weights {str(path)!r} ({type(err).__name__}); {WEIGHTS_HINT}") from None
    model = load_inception_weights(InceptionV3(), state, source=str(path))
    return model.eval().requires_grad_(False).to(device)


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the published layout, for tests and throughput benchmarks without the download.

    He-initialised convolutions and mildly perturbed BatchNorm statistics keep activations O(1)
    through all 94 layers, so features are informative (not all zero) for pipeline tests.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in InceptionV3().state_dict().items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif key.endswith("bn.running_var"):
            state[key] = 1.0 + 0.1 * torch.rand(value.shape, generator=generator)
        elif key.endswith("bn.running_mean") or key.endswith("bn.bias"):
            state[key] = 0.05 * torch.randn(value.shape, generator=generator)
        elif key.endswith("bn.weight"):
            state[key] = torch.ones(value.shape)
        elif key.startswith("fc."):
            state[key] = 0.02 * torch.randn(value.shape, generator=generator)
        # num_batches_tracked is left out, as in the published files
    return state
