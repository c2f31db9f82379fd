"""Differentiable augmentation (DiffAug; Zhao, Liu, Lin, Zhu & Han 2020) of the discriminator's inputs,
in the variant RAE uses (StyleGAN-T's `training/diffaug.py`, RAE's `disc/diffaug.py`).

Each call augments one batch, real or fake, on the same terms: with probability `prob` each of three
operations is on for the whole batch, and each sample draws its own parameters (7 uniforms u_0..u_6):

* translation by up to 1/8 of the side in each direction, integer pixels, zeros shifted in:
  dy = floor(u_0 (2 d + 1)) - d with d = round(H / 8), dx likewise from u_1 and W;
* colour: brightness x + (u_2 - 0.5); saturation: (x - m_c) 2 u_3 + m_c around the channel mean m_c of
  each pixel; contrast: (x - m) (u_4 + 0.5) + m around the image's mean m;
* cutout of a `cutout` x side square centred at (floor(u_5 (H + 1 - h % 2)), floor(u_6 (W + 1 - w % 2)))
  (clipped to the image), set to zero. RAE's config has cutout 0: nothing is cut.

Being differentiable, the augmented fakes still pass the generator's gradient (Zhao et al.). The draws are
arguments (`switches`: three bools; `uniforms`: (7, N)), so that every sample's augmentation is a function
of the run's seed, the step and its global index (`fastdit.decoder_training.step`), not of the process
count. RAE draws them from the global generator (`torch.rand(3) <= prob`, `torch.rand(7, N, 1, 1)`), in that
order: passing those values reproduces its output exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRANSLATION = 0.125  # the largest shift, as a fraction of the side


def diffaug(images: torch.Tensor, switches, uniforms: torch.Tensor, *, cutout: float = 0.0) -> torch.Tensor:
    """Images (N, C, H, W) -> augmented images (N, C, H, W), float32 (RAE casts to float32 first).

    `switches`: (translate, colour, cut) bools for the batch; `uniforms`: (7, N) in [0, 1)."""
    x = images.float()
    n, _, height, width = x.shape
    translate, colour, cut = (bool(s) for s in switches)
    u = uniforms.to(device=x.device, dtype=torch.float32).view(7, n, 1, 1)
    if translate:
        x = _translate(x, u[0], u[1])
    if colour:
        x = x + (u[2].unsqueeze(-1) - 0.5)  # brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (u[3].unsqueeze(-1) * 2) + mean  # saturation
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (u[4].unsqueeze(-1) + 0.5) + mean  # contrast
    if cut and cutout > 0:
        x = x * _cutout_mask(n, height, width, cutout, u[5], u[6], x.device, x.dtype).unsqueeze(1)
    return x


def _translate(x: torch.Tensor, u_h: torch.Tensor, u_w: torch.Tensor) -> torch.Tensor:
    """Shift each sample by whole pixels (dy, dx) drawn from `u_h`, `u_w` (N, 1, 1); zeros come in."""
    n, c, height, width = x.shape
    d_h, d_w = round(height * TRANSLATION), round(width * TRANSLATION)
    shift_h = (u_h * (2 * d_h + 1)).floor().long() - d_h  # (N, 1, 1)
    shift_w = (u_w * (2 * d_w + 1)).floor().long() - d_w
    # Gather from the image padded by one zero pixel: row r reads padded row r + dy + 1, clamped to the
    # padding when it falls outside, so whatever is shifted in is zero.
    rows = (torch.arange(height, device=x.device).view(1, height, 1) + shift_h + 1).clamp(0, height + 1)
    cols = (torch.arange(width, device=x.device).view(1, 1, width) + shift_w + 1).clamp(0, width + 1)
    padded = F.pad(x, (1, 1, 1, 1))  # (N, C, H + 2, W + 2)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)


def _cutout_mask(n, height, width, ratio, u_h, u_w, device, dtype) -> torch.Tensor:
    """(N, H, W): ones, with a round(ratio H) x round(ratio W) square of zeros per sample."""
    cut_h, cut_w = round(height * ratio), round(width * ratio)
    mask = torch.ones(n, height, width, device=device, dtype=dtype)
    if cut_h == 0 or cut_w == 0:
        return mask
    centre_h = (u_h * (height + (1 - cut_h % 2))).floor().long()  # (N, 1, 1)
    centre_w = (u_w * (width + (1 - cut_w % 2))).floor().long()
    rows = (torch.arange(cut_h, device=device).view(1, cut_h, 1) + centre_h - cut_h // 2).clamp(0, height - 1)
    cols = (torch.arange(cut_w, device=device).view(1, 1, cut_w) + centre_w - cut_w // 2).clamp(0, width - 1)
    mask[torch.arange(n, device=device).view(n, 1, 1), rows, cols] = 0
    return mask
