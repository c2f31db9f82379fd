"""TF32 for sampling on CUDA, as DiT's sample_ddp.py: on by default in `sample`, `sample-ddp` and the
app, off with --no-tf32, and recorded by sample-ddp as a setting. On a CPU the test stands a "cuda"
device in for the loaded model's and watches `torch.backends.cuda.matmul.allow_tf32` while sampling."""

import json

import numpy as np
import pytest
import torch

import fastdit.loading
import fastdit.sampling
import fastdit.sample_ddp.runner as runner
from fastdit.checkpoint import export_weights
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.models import build_model
from fastdit.precision import tf32, tf32_in_effect, use_tf32
from cli_runner import run_cli

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def restore_backend_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=1, num_classes=4)
    return export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None)),
                          tmp_path / "tiny.safetensors")


@pytest.fixture
def on_a_gpu(monkeypatch):
    """The model loads as it does, then is said to sit on a CUDA device; returns the TF32 flag seen by
    each call that samples (of `generate` for `sample`, of `sample_by_index` for sample-ddp)."""
    seen = []
    load = fastdit.loading.load_for_sampling

    def loaded_on_cuda(**kwargs):
        model, info, latent_space, _ = load(**kwargs)
        return model, info, latent_space, CUDA

    def fake_generate(model, latent_space, labels, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return np.zeros((len(labels), 8, 8, 3), np.uint8)

    def fake_sample_by_index(model, latent_space, indices, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        yield indices, np.zeros(len(indices), np.int64), np.zeros((len(indices), 8, 8, 3), np.uint8)

    monkeypatch.setattr(fastdit.loading, "load_for_sampling", loaded_on_cuda)
    monkeypatch.setattr(fastdit.sampling, "generate", fake_generate)
    monkeypatch.setattr(runner, "sample_by_index", fake_sample_by_index)
    return seen


def test_the_helpers_act_on_cuda_only_and_give_the_settings_back():
    torch.backends.cuda.matmul.allow_tf32 = False
    with tf32(torch.device("cpu"), True):
        assert torch.backends.cuda.matmul.allow_tf32 is False  # a CPU computes float32 whatever the flag
    with tf32(CUDA, True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with tf32(CUDA, False):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert tf32_in_effect(CUDA, True) and not tf32_in_effect(CUDA, False) and not tf32_in_effect(torch.device("cpu"), True)
    use_tf32(CUDA, True)
    assert torch.get_float32_matmul_precision() == "high"  # what torch calls TF32


@pytest.mark.parametrize("flags, expected", [([], True), (["--no-tf32"], False), (["--tf32"], True)])
def test_fastdit_sample_turns_tf32_on_unless_told_not_to(tiny_ckpt, tmp_path, on_a_gpu, flags, expected):
    torch.backends.cuda.matmul.allow_tf32 = not expected
    assert run_cli("sample", "--ckpt", tiny_ckpt, "--class-labels", 1, 2, "--out", tmp_path / "grid.png", *flags) == 0
    assert on_a_gpu == [expected]
    assert torch.backends.cuda.matmul.allow_tf32 is (not expected)  # the process's setting comes back after


def test_sample_ddp_samples_in_tf32_records_it_and_refuses_to_mix_it_with_full_float32(tiny_ckpt, tmp_path, on_a_gpu, capsys):
    out = tmp_path / "samples.npz"
    run = ["sample-ddp", "--ckpt", tiny_ckpt, "--out", out, "--num-fid-samples", 4, "--chunk-size", 2, "--batch-size", 2,
           "--num-sampling-steps", 3, "--device", "cpu", "--no-progress"]
    torch.backends.cuda.matmul.allow_tf32 = False
    assert run_cli(*run) == 0
    assert on_a_gpu == [True, True] and torch.backends.cuda.matmul.allow_tf32 is False
    assert json.loads(out.with_suffix(".json").read_text())["tf32"] is True
    capsys.readouterr()
    assert run_cli(*run, "--no-tf32") == 2  # TF32 images differ from float32 ones by more than rounding
    assert "already written with other settings (tf32: true -> false)" in capsys.readouterr().err
    out.unlink()
    assert run_cli(*run, "--no-tf32") == 0
    assert on_a_gpu[2:] == [False, False] and json.loads(out.with_suffix(".json").read_text())["tf32"] is False


def test_on_a_cpu_sample_ddp_records_no_tf32(tiny_ckpt, tmp_path):
    """A CPU computes float32 whatever the flag: its runs record tf32 false, as runs from before TF32 read."""
    out = tmp_path / "cpu.npz"
    assert run_cli("sample-ddp", "--ckpt", tiny_ckpt, "--out", out, "--num-fid-samples", 2, "--num-sampling-steps", 2,
                   "--device", "cpu", "--no-progress") == 0
    assert json.loads(out.with_suffix(".json").read_text())["tf32"] is False


def test_the_app_takes_the_flag():
    from fastdit.cli import build_parser

    assert build_parser().parse_args(["app"]).tf32 is True
    assert build_parser().parse_args(["app", "--no-tf32"]).tf32 is False


@pytest.mark.gpu
def test_on_a_gpu_sample_runs_in_tf32_unless_told_not_to(tiny_ckpt, tmp_path, monkeypatch):
    seen = []
    generate = fastdit.sampling.generate

    def watching(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return generate(*args, **kwargs)

    monkeypatch.setattr(fastdit.sampling, "generate", watching)
    common = ["sample", "--ckpt", tiny_ckpt, "--device", "cuda", "--num-sampling-steps", 2, "--class-labels", 1]
    assert run_cli(*common, "--out", tmp_path / "tf32.png") == 0
    assert run_cli(*common, "--out", tmp_path / "fp32.png", "--no-tf32") == 0
    assert seen == [True, False]
