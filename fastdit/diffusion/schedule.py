"""Noise schedules and timestep respacing, all in float64 (Ho et al. 2020; Nichol & Dhariwal 2021)."""

from __future__ import annotations

import numpy as np

from ..errors import UserError


def linear_betas(num_steps: int = 1000) -> np.ndarray:
    """DDPM's linear schedule, 1e-4 .. 0.02 over 1000 steps (rescaled so other lengths span the same range)."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of Nichol & Dhariwal (2021), eq. 17."""

    def alpha_bar(t: float) -> float:
        return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=np.float64,
    )


def named_betas(name: str, num_steps: int) -> np.ndarray:
    if name == "linear":
        return linear_betas(num_steps)
    if name == "cosine":
        return cosine_betas(num_steps)
    raise UserError(f"unknown noise schedule {name!r}; choose 'linear' or 'cosine'")


def space_timesteps(num_steps: int, spacing: str | int | list[int]) -> list[int]:
    """Which of the `num_steps` original timesteps a respaced process keeps (sorted).

    `spacing` is "250" (250 evenly spread steps), "10,15,20" (that many steps in each of three equal
    sections), or "ddimN" (the integer stride that gives exactly N steps, as DDIM uses).
    Inside a section of `size` steps, N kept steps sit at round(0), round(s), round(s+s), ... with the
    fractional stride s = (size-1)/(N-1): rounding a running sum (not k*s) is what the IDDPM code does,
    and the kept sets must match it exactly to reuse its models' numbers.
    """
    if isinstance(spacing, int):
        spacing = str(spacing)
    if isinstance(spacing, str):
        spacing = spacing.strip()
        if spacing == "":
            return list(range(num_steps))
        if spacing.startswith("ddim"):
            try:
                desired = int(spacing[len("ddim"):])
            except ValueError:
                raise UserError(f"bad timestep respacing {spacing!r}; write e.g. 'ddim50'") from None
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == desired:
                    return list(range(0, num_steps, stride))
            raise UserError(f"cannot make {desired} DDIM steps with an integer stride over {num_steps}")
        try:
            section_counts = [int(part) for part in spacing.split(",")]
        except ValueError:
            raise UserError(f"bad timestep respacing {spacing!r}; write e.g. '250', '10,20,30' or 'ddim50'") from None
    else:
        section_counts = list(spacing)
    if any(count <= 0 for count in section_counts):
        raise UserError(f"timestep respacing counts must be positive, got {section_counts}")
    size_per, extra = divmod(num_steps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise UserError(f"cannot take {count} steps from a section of {size} (of {num_steps} in all)")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, kept: list[int]) -> np.ndarray:
    """Betas of the process that visits only `kept` timesteps with the same ᾱ at each of them:
    β'_k = 1 − ᾱ[m_k] / ᾱ[m_{k−1}] (with ᾱ = 1 before the first kept step)."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    new_betas, last = [], 1.0
    for index in kept:
        new_betas.append(1.0 - alphas_cumprod[index] / last)
        last = alphas_cumprod[index]
    return np.array(new_betas, dtype=np.float64)
