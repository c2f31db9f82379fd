"""Representation alignment (REPA): the loss against float64, the projector's and the encoder's
gradients, the export, and resuming."""

import pytest
import torch

from fastdit.train.extensions.repa import Projector, alignment_loss


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


def test_projector_is_repas_three_layer_silu_mlp():
    projector = Projector(64, 128, 32)
    kinds = [type(layer).__name__ for layer in projector]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert projector(torch.zeros(2, 5, 64)).shape == (2, 5, 32)


# ----------------------------------------------------------------------------------------------
# REPA in training
# ----------------------------------------------------------------------------------------------

import json  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from fastdit.checkpoint import load_model  # noqa: E402
from fastdit.models import DiT  # noqa: E402
from fastdit.train.loop import train  # noqa: E402
from test_train import TINY, final_state, tiny_config  # noqa: E402
from test_train_distributed import assert_same_after_adam, torchrun  # noqa: E402


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A randomly initialised digit encoder as TorchScript: 4x4 tokens of 64 values at 8 px."""
    from fastdit.demo.encoder import DigitTokens, save_digit_encoder

    torch.manual_seed(1)
    return str(save_digit_encoder(DigitTokens(), tmp_path_factory.mktemp("encoder") / "tiny.ts"))


def repa_fields(encoder, **more):
    return {**dict(repa=encoder, repa_depth=1, repa_projector_dim=32), **more}


def test_alignment_trains_the_dit_and_the_projector_and_leaves_the_encoder_alone(tiny_encoder):
    from fastdit.distributed import DistInfo
    from fastdit.model_info import LatentInfo
    from fastdit.models import build_model
    from fastdit.train.loop import build_training_state
    from fastdit.train.step import train_step
    from fastdit.train.training_data import TrainingData

    config = tiny_config("unused", **repa_fields(tiny_encoder, objective="flow"))
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=2)
    data = TrainingData(dataset=None, latent_shape=(1, 8, 8), latent_info=LatentInfo(kind="pixels", vae=None),
                        class_names=None, device=torch.device("cpu"))
    state = build_training_state(config, DistInfo(0, 1, 0, torch.device("cpu")), model, data)
    alignment = state.extension("repa")
    encoder = alignment.encoder
    before = {name: t.clone() for name, t in [*encoder.named_parameters(), *encoder.named_buffers()]}
    projector_before = [p.clone() for p in alignment.projector.parameters()]
    dit_before = {name: p.clone() for name, p in model.named_parameters()}
    x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (16,))
    for step in range(3):
        state.position.step = step
        result = train_step(state, (x, y), config.build_objective())
    assert set(result.terms) == {"loss", "repa"} and not result.skipped and result.grad_norm > 0
    assert before and all(torch.equal(t, dict([*encoder.named_parameters(), *encoder.named_buffers()])[n])
                          for n, t in before.items())
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(alignment.projector.parameters(), projector_before))
    # The alignment reaches the blocks up to K = 1 through the tokens; everything trains.
    assert all(not torch.equal(p, dit_before[n]) for n, p in model.named_parameters() if n != "pos_embed")


def test_a_repa_export_is_the_official_layout_and_the_run_resumes_exactly(tiny_encoder, tmp_path):
    fields = repa_fields(tiny_encoder)
    reference = train(tiny_config(tmp_path / "a", max_steps=4, ckpt_every=2, **fields))
    train(tiny_config(tmp_path / "b", max_steps=2, ckpt_every=2, **fields))
    resumed = train(tiny_config(tmp_path / "b", max_steps=4, ckpt_every=2, **fields))
    a, b = final_state(reference.run_dir), final_state(resumed.run_dir)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for k, value in a["alignment"]["projector"].items():
        assert torch.equal(value, b["alignment"]["projector"][k]), k
    assert a["alignment"]["optimizer"]["state"].keys() == b["alignment"]["optimizer"]["state"].keys()
    for key, moments in a["alignment"]["optimizer"]["state"].items():
        assert all(torch.equal(v, b["alignment"]["optimizer"]["state"][key][m]) for m, v in moments.items())
    # The export holds the DiT's EMA alone, under its official names: it loads strictly into a DiT.
    weights = load_file(str(reference.export))
    model, info = load_model(reference.export)
    DiT(info.config).load_state_dict(weights, strict=True)
    assert not any("projector" in key for key in weights)
    metrics = [json.loads(line) for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "repa" in metrics[-1] and metrics[-1]["loss"] == pytest.approx(
        metrics[-1]["mse"] + metrics[-1]["vb"] + 0.5 * metrics[-1]["repa"], rel=1e-6)


def test_two_processes_align_like_one(tiny_encoder, tmp_path):
    flags = ["--repa", tiny_encoder, "--repa-depth", "1", "--repa-projector-dim", "32"]
    result = torchrun(tmp_path, *TINY, *flags, "--max-steps", "4", "--ckpt-every", "4", "--device", "cpu",
                      "--results-dir", str(tmp_path / "two"), "--micro-batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun runs each process: the same float summation order
    try:
        one = train(tiny_config(tmp_path / "one", max_steps=4, ckpt_every=4, **repa_fields(tiny_encoder)))
    finally:
        torch.set_num_threads(threads)
    two_state, one_state = final_state(tmp_path / "two" / one.run_dir.name), final_state(one.run_dir)
    for key in one_state["model"]:
        assert_same_after_adam(two_state["model"][key], one_state["model"][key], key, steps=4)
    # The projector is replicated and its gradients averaged over the processes: the same function.
    for key, value in one_state["alignment"]["projector"].items():
        assert_same_after_adam(two_state["alignment"]["projector"][key], value, key, steps=4)


def test_bad_alignment_settings_are_one_line(tiny_encoder, tmp_path):
    from fastdit.errors import UserError

    with pytest.raises(UserError, match="--repa-depth 7 is not a block of DiT-T/2 \\(blocks 1..2\\)"):
        train(tiny_config(tmp_path, **repa_fields(tiny_encoder, repa_depth=7)))


def test_fsdp_aligns_like_ddp_with_the_projector_replicated_and_clipped_jointly(tiny_encoder, tmp_path):
    # Under FSDP the DiT's gradients are sharded (DTensor) and the projector's replicated: the joint
    # clipping norm is combined from the two parts. --grad-clip 0.05 clips every step here, so a wrong
    # norm (e.g. of one part only, or of one shard) changes the weights far beyond the bound below.
    from test_fsdp import losses, torchrun as fsdp_torchrun

    flags = ["--repa", tiny_encoder, "--repa-depth", "1", "--repa-projector-dim", "32", "--grad-clip", "0.05",
             "--max-steps", "4", "--ckpt-every", "4"]
    fsdp_torchrun(tmp_path, *flags, "--results-dir", str(tmp_path / "ddp"))
    fsdp_torchrun(tmp_path, *flags, "--results-dir", str(tmp_path / "fsdp"), "--fsdp")
    ddp, fsdp = tmp_path / "ddp" / "run", tmp_path / "fsdp" / "run"
    # As test_fsdp.py: the runs differ in how two processes' gradients are summed (a few u per element),
    # which Adam turns into a few u of each step; 1e-5 relative bounds it on the losses.
    assert losses(fsdp) == pytest.approx(losses(ddp), rel=1e-5)
    ddp_state, fsdp_state = final_state(ddp), final_state(fsdp)
    for key, value in ddp_state["alignment"]["projector"].items():
        assert_same_after_adam(fsdp_state["alignment"]["projector"][key], value, key, steps=4)
    for key, value in ddp_state["model"].items():
        assert_same_after_adam(fsdp_state["model"][key], value, key, steps=4)
