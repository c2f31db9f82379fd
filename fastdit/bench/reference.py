"""The reference rows: one step exactly as the released DiT code runs it with today's timm.

Training (its train.py): fp32, eager, attention through `scaled_dot_product_attention` (timm's fused
path, which the official blocks take), no checkpointing, `training_losses` (MSE + VLB), AdamW with its
defaults (the multi-tensor path), `zero_grad` between forward and backward, and the per-parameter EMA
loop. Sampling (its sample.py): `forward_with_cfg` on the doubled batch, then one `p_sample`.
fastdit's model computes what the official one computes (tests/test_model_parity.py), so the reference
differs from the fastdit rows only in how the step is run.

`reference+bf16` / `reference+fp16` run the same step the way a user of the official code adds mixed
precision: the model's forward and the loss under a plain `torch.autocast` (defaults: its weight-cast
cache on), and for fp16 the `GradScaler` of PyTorch's AMP recipe; nothing else changes. They are what
fastdit's bf16 and fp16 rows are compared with: like against like.
"""

from __future__ import annotations

import contextlib

import torch

from ..diffusion import create_diffusion
from ..precision import AUTOCAST_DTYPES


def user_autocast(device: torch.device, precision: str):
    """The one line a user of the official code adds for mixed precision: `torch.autocast` as documented."""
    dtype = AUTOCAST_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def official_ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # train.py's update_ema: one mul_ and one add_ per parameter.
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def reference_train_step(model: torch.nn.Module, ema: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                         precision: str = "fp32"):
    """-> step(): one official training step on the fixed batch (x, y), timesteps drawn anew; under a
    plain autocast for `precision` bf16/fp16 (fp16 with AMP's gradient scaler)."""
    diffusion = create_diffusion("")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    scaler = torch.amp.GradScaler(x.device.type, enabled=precision == "fp16")

    def step() -> torch.Tensor:
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
        with user_autocast(x.device, precision):
            loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        official_ema_update(ema, model, 0.9999)
        return loss

    return step


def reference_sample_step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                          precision: str = "fp32"):
    """-> step(): one official guided DDPM step (250-step respacing, as sample.py) at timestep t; the
    step under a plain autocast for `precision` bf16/fp16."""
    diffusion = create_diffusion("250")
    x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
    y_in = torch.cat([y, torch.full_like(y, model.config.null_class)])

    def model_fn(x_, t_, y):
        return model.forward_with_cfg(x_, t_, y, cfg_scale)

    @torch.no_grad()
    def step() -> torch.Tensor:
        with user_autocast(x.device, precision):
            return diffusion.p_sample(model_fn, x_in, t_in, model_kwargs={"y": y_in})["sample"]

    return step
