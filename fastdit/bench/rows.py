"""What one row of the benchmark runs, named by its options: `reference` (the official step) with at most
a precision (`reference+bf16`, `reference+fp16`: the official step under a plain autocast, the row the
same-precision fastdit rows are compared with), or `fastdit` followed by any of
`+bf16`, `+fp16`, `+compile` and one checkpointing policy (`+ckpt` for every block, `+ckpt-mlp`,
`+ckpt-every-K`), and for training `+repa` (representation alignment with an encoder of DINOv2-B/14's
size, randomly initialised: the row measures its cost, not its benefit) and an objective other than
DiT's (`+flow`, `+x-pred`, `+meanflow`: what its loss costs, e.g. MeanFlow's JVP against a flow step)
and `+route` (token routing, TREAD, at the paper's defaults: half the tokens skip blocks[2:-1]).
fastdit's training rows run
the real training step (`fastdit.train.step.train_step`:
the setup `fastdit train` builds, its seeded draws, loss, fused AdamW and EMA); its sampling rows run the
guided model as `fastdit sample` does, with one DDPM step.

Every row, reference or not, runs with TF32 on for float32 matmuls on a GPU, as the official train.py
and sample_ddp.py do and as fastdit does by default: fp32 ratios compare like with like. Models are
built on the device itself (a DiT-XL/2 initialised on the CPU first takes longer than its measurement)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..host_memory import keep_freed_host_memory
from ..objectives import build_objective, objective_names
from ..precision import PRECISIONS, use_tf32
from ..train.extensions.routing import PAPER_RATE

CHECKPOINT_OPTION = re.compile(r"ckpt(-mlp|-every-[1-9][0-9]*)?")
# The stand-in of REPA's encoder: DINOv2-B/14's shape at 224 px (its FLOPs enter the MFU column).
DINOV2_B14 = {"image_size": 224, "patch": 14, "width": 768, "depth": 12, "heads": 12, "mlp": 3072}
REPA_PROJECTOR_DIM = 2048


@dataclass(frozen=True)
class Row:
    name: str
    reference: bool = False
    precision: str = "fp32"
    compile: bool = False
    checkpointing: str = "off"  # fastdit train's policy: off | blocks | mlp | every-K
    repa: bool = False  # REPA's alignment term with a DINOv2-B/14-sized encoder on 224-px images
    objective: str = "ddpm"  # the training objective (fastdit.objectives)
    route: bool = False  # token routing (TREAD) at the paper's rate and span


def reference_name(precision: str) -> str:
    """The name of the reference row at `precision`: what a row of that precision is compared with."""
    return "reference" if precision == "fp32" else f"reference+{precision}"


def parse_row(name: str, *, training: bool) -> Row:
    head, *options = name.split("+")
    if head == "reference":
        if len(options) > 1 or (options and options[0] not in PRECISIONS):
            raise UserError(f"row {name!r}: the reference takes a precision only (reference, reference+bf16, "
                            f"reference+fp16)")
        return Row(name, reference=True, precision=options[0] if options else "fp32")
    if head != "fastdit":
        raise UserError(f"row {name!r} must be 'reference' or start with 'fastdit' (e.g. fastdit+bf16+ckpt)")
    fields = {}
    for option in options:
        if option in PRECISIONS and option != "fp32":
            fields["precision"] = option
        elif option == "compile":
            fields["compile"] = True
        elif training and CHECKPOINT_OPTION.fullmatch(option):
            fields["checkpointing"] = option.removeprefix("ckpt-") if "-" in option else "blocks"
        elif training and option == "repa":
            fields["repa"] = True
        elif training and option == "route":
            fields["route"] = True
        elif training and option in objective_names() and option != "ddpm":
            fields["objective"] = option
        else:
            others = ", ".join(name for name in objective_names() if name != "ddpm")
            choices = "bf16, fp16, compile" + (f", ckpt, ckpt-mlp, ckpt-every-K, repa, route, {others}" if training else "")
            raise UserError(f"row {name!r}: unknown option {option!r}; the options are {choices}")
    return Row(name, **fields)


@dataclass
class Measurement:
    steps_per_second: float
    peak_gb: float
    compile_seconds: float  # the untimed warm-up steps, compilation included


def time_steps(step, *, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """-> (seconds of the warm-up steps, steps per second of the timed ones)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _synchronize(device)
    warm = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the warm-up's compile workspace is not a step's memory
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return warm, steps / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(row: Row, model_name: str, batch: int, latent: int, device: torch.device):
    """-> step(): one training step of `row` on a fixed random batch of latents."""
    from ..distributed import DistInfo
    from ..model_info import LatentInfo
    from ..models import build_model
    from ..train.config import TrainConfig
    from ..train.ema import make_ema
    from ..train.loop import build_training_state
    from ..train.step import train_step
    from ..train.training_data import TrainingData
    from .reference import reference_train_step

    torch.manual_seed(0)
    use_tf32(device, True)  # the official train.py turns TF32 on, and so does `fastdit train`: both sides alike
    if not row.reference:
        keep_freed_host_memory()  # as `fastdit train` does; the reference runs with the allocator's defaults
    network = build_objective(row.objective).network()  # e.g. MeanFlow's second time input
    with torch.device(device):
        model = build_model(model_name, input_size=latent, num_classes=1000, **network).train()
    x = torch.randn(batch, model.config.in_channels, latent, latent, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if row.reference:
        return reference_train_step(model, make_ema(model), x, y, row.precision)
    config = TrainConfig.create(model=model_name, image_size=latent * 8, data_path="bench", global_batch_size=batch,
                         precision=row.precision, gradient_checkpointing=row.checkpointing, compile=row.compile,
                         progress=False, objective=row.objective, route=PAPER_RATE if row.route else 0.0)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    data = TrainingData(dataset=None, latent_shape=tuple(x.shape[1:]), latent_info=LatentInfo(), class_names=None,
                        device=device)
    state = build_training_state(config, dist, model, data)
    objective = config.build_objective()
    batch_of = (x, y)
    if row.repa:  # the REPA extension `--repa` builds, over a stand-in encoder (no download)
        state.extensions.append(dinov2_sized_alignment(model, config, device))
        images = torch.rand(batch, 3, latent * 8, latent * 8, device=device) * 2 - 1  # what the latents encode
        batch_of = (x, y, images)

    def step() -> torch.Tensor:
        loss = train_step(state, batch_of, objective).terms["loss"]
        state.position.step += 1
        return loss

    return step


def dinov2_sized_alignment(model, config, device: torch.device):
    """REPA's alignment as `fastdit train --repa dinov2-vitb14` sets it up (block 8, or 4 for models of
    12 blocks or fewer as REPA does for B/2; projector 2048), with an encoder of DINOv2-B/14's shape at
    224 px (patch 14, 12 layers of width 768, 12 heads, MLP 3072: 257 tokens) built from torch's own
    layers with random weights: its cost per step is DINOv2-B's, with no download and no timm."""
    from ..encoders import FrozenEncoder
    from ..train.extensions.repa import Projector, RepresentationAlignment, paper_depth
    from ..train.loop import make_optimizer

    shape = DINOV2_B14
    width, tokens = shape["width"], (shape["image_size"] // shape["patch"]) ** 2 + 1  # 257: the class token too

    class ViTB14(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patches = torch.nn.Conv2d(3, width, kernel_size=shape["patch"], stride=shape["patch"])
            self.cls = torch.nn.Parameter(torch.zeros(1, 1, width))
            self.pos = torch.nn.Parameter(torch.zeros(1, tokens, width))
            layer = torch.nn.TransformerEncoderLayer(width, shape["heads"], shape["mlp"], activation="gelu",
                                                     batch_first=True, norm_first=True)
            self.blocks = torch.nn.TransformerEncoder(layer, shape["depth"], enable_nested_tensor=False)

        def forward(self, x):
            tokens = self.patches(x).flatten(2).transpose(1, 2)  # (N, 256, 768)
            return self.blocks(torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos)

    with torch.device(device):
        encoder = FrozenEncoder(ViTB14(), resolution=shape["image_size"], num_prefix_tokens=1, name="DINOv2-B/14-sized")
        projector = Projector(model.config.hidden_size, REPA_PROJECTOR_DIM, encoder.dim)
    return RepresentationAlignment(encoder, projector, paper_depth(model.config.depth), 0.5,
                                   make_optimizer(projector, config.optimisation), grid_size=model.config.grid_size,
                                   encoder_name=encoder.name)


def make_sample_step(row: Row, model_name: str, batch: int, latent: int, device: torch.device, cfg_scale: float):
    """-> step(): one guided DDPM step of `row` (250 respaced steps, at the middle one)."""
    from ..compile import compile_blocks
    from ..diffusion import create_diffusion
    from ..models import build_model
    from ..sampling import ClassifierFreeGuidance
    from ..sampling.generate import in_precision
    from .reference import reference_sample_step

    torch.manual_seed(0)
    use_tf32(device, True)  # as DiT's sample_ddp.py, and `fastdit sample` unless --no-tf32
    if not row.reference:
        keep_freed_host_memory()  # as `fastdit sample` does
    with torch.device(device):
        model = build_model(model_name, input_size=latent, num_classes=1000).eval()
    x = torch.randn(batch, model.config.in_channels, latent, latent, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    t = torch.full((batch,), 125, device=device, dtype=torch.long)
    if row.reference:
        return reference_sample_step(model, x, t, y, cfg_scale, row.precision)
    if row.compile:
        compile_blocks(model)
    runnable = in_precision(model, row.precision)  # as generate() runs the model
    # DiT's guidance (3 of 4 latent channels, as the official sampler does), at a step inside any interval.
    guided = ClassifierFreeGuidance(runnable, cfg_scale, model.config.null_class, model.config.in_channels, 3)
    diffusion = create_diffusion("250")

    @torch.no_grad()
    def step() -> torch.Tensor:
        return diffusion.p_sample(guided, x, t, model_kwargs={"y": y})["sample"]

    return step

