"""The reference rows: one step exactly as the released DiT code runs it with today's timm.

Training (its train.py): fp32, eager, attention through `scaled_dot_product_attention` (timm's fused
path, which the official blocks take), no checkpointing, `training_losses` (MSE + VLB), AdamW with its
defaults (the multi-tensor path), `zero_grad` between forward and backward, and the per-parameter EMA
loop. Sampling (its sample.py): `forward_with_cfg` on the doubled batch, then one `p_sample`.
fastdit's model computes what the official one computes (tests/test_model_parity.py), so the reference
differs from the fastdit rows only in how the step is run.
"""

from __future__ import annotations

import torch

from ..diffusion import create_diffusion


@torch.no_grad()
def official_ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # train.py's update_ema: one mul_ and one add_ per parameter.
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def reference_train_step(model: torch.nn.Module, ema: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """-> step(): one official training step on the fixed batch (x, y), timesteps drawn anew."""
    diffusion = create_diffusion("")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)

    def step() -> torch.Tensor:
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
        loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        official_ema_update(ema, model, 0.9999)
        return loss

    return step


def reference_sample_step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float):
    """-> step(): one official guided DDPM step (250-step respacing, as sample.py) at timestep t."""
    diffusion = create_diffusion("250")
    x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
    y_in = torch.cat([y, torch.full_like(y, model.config.null_class)])

    def model_fn(x_, t_, y):
        return model.forward_with_cfg(x_, t_, y, cfg_scale)

    @torch.no_grad()
    def step() -> torch.Tensor:
        return diffusion.p_sample(model_fn, x_in, t_in, model_kwargs={"y": y_in})["sample"]

    return step
