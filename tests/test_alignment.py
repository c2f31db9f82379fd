"""Representation alignment (REPA): the loss against float64, the projector's and the encoder's
gradients, the export, and resuming."""

import pytest
import torch

from fastdit.train.alignment import Projector, alignment_loss, tokens_to_grid


def test_alignment_loss_equals_a_direct_float64_computation():
    generator = torch.Generator().manual_seed(0)
    projected = torch.randn(3, 16, 8, generator=generator)
    target = torch.randn(3, 16, 8, generator=generator)
    loss = alignment_loss(projected, target)
    p, y = projected.double(), target.double()
    expected = -((p * y).sum(-1) / (p.norm(dim=-1) * y.norm(dim=-1))).mean(dim=1)
    # A cosine of float32 vectors of 8 values: the dot product and both norms round by ~8u relative
    # (u = 2^-24 ≈ 6e-8), so the cosine by ≤ 3·8u ≈ 1.5e-6 in absolute terms (|cos| ≤ 1), and the mean
    # over 16 tokens by no more; 1e-5 keeps a margin of 6.
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)
    assert loss.shape == (3,)
    # Aligned features give −1, opposite ones +1.
    assert torch.allclose(alignment_loss(target, 2 * target), torch.full((3,), -1.0), atol=1e-6)
    assert torch.allclose(alignment_loss(target, -target), torch.full((3,), 1.0), atol=1e-6)


def test_encoder_tokens_are_resized_to_the_dit_grid():
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    assert tokens_to_grid(tokens, 4) is tokens  # same grid: untouched
    small = tokens_to_grid(tokens, 2)
    assert small.shape == (2, 4, 3)
    # Bilinear 4x4 -> 2x2 without corner alignment averages each 2x2 block of a linear ramp exactly.
    grid = tokens.transpose(1, 2).reshape(2, 3, 4, 4)
    blocks = grid.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5)).reshape(2, 3, 4).transpose(1, 2)
    torch.testing.assert_close(small, blocks)
    with pytest.raises(ValueError, match="square grid"):
        tokens_to_grid(torch.zeros(1, 15, 3), 2)


def test_projector_is_repas_three_layer_silu_mlp():
    projector = Projector(64, 128, 32)
    kinds = [type(layer).__name__ for layer in projector]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert projector(torch.zeros(2, 5, 64)).shape == (2, 5, 32)
