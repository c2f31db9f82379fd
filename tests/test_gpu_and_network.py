"""Checks that need a CUDA device or the internet; skipped cleanly without them (see conftest.py)."""

import pytest
import torch

from conftest import load_fixture, recipe_state_dict
from fastdit.models import build_model


@pytest.mark.gpu
def test_cuda_forward_matches_cpu_and_bf16_is_close():
    golden = load_fixture("model_dit_s8_golden.pt")
    model = build_model("DiT-S/8", **golden["kwargs"]).eval()
    model.load_state_dict(recipe_state_dict(model))
    with torch.no_grad():
        cpu = model(golden["x"], golden["t"], golden["y"])
        cuda = model.cuda()(golden["x"].cuda(), golden["t"].cuda(), golden["y"].cuda()).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(golden["x"].cuda(), golden["t"].cuda(), golden["y"].cuda()).float().cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-3, atol=1e-3 * cpu.abs().max().item())
    assert (bf16 - cpu).abs().max() < 0.05 * cpu.abs().max()


@pytest.mark.gpu
def test_cuda_training_steps(tmp_path):
    from test_train import tiny_config

    from fastdit.train.loop import train

    for precision in ("fp32", "bf16", "fp16"):
        result = train(tiny_config(tmp_path / precision, max_steps=3, precision=precision, device="cuda",
                                   gradient_checkpointing=True, micro_batch_size=8))
        assert result.step == 3 and result.last_loss < 5


@pytest.mark.network
def test_official_checkpoint_downloads_and_loads_strictly():
    from fastdit.checkpoint import load_model

    model, info = load_model("DiT-XL-2-256x256.pt")
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert info.image_size == 256 and info.config.num_classes == 1000
