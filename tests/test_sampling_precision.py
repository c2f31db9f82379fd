"""Sampling fast paths: the model's forward in bf16 (the sampler stays float32), compiled blocks, and
what `sample` / `sample-ddp` make of --precision and --compile."""

import functools
import importlib
import json

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fastdit.checkpoint import export_weights
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.cli import main
from fastdit.compile import compile_blocks
from fastdit.errors import UserError
from fastdit.latents import PixelSpace
from fastdit.models import build_model
from fastdit.objectives import build_objective
from fastdit.sampling import SamplingOptions, generate
from fastdit.sampling.generate import in_precision

generate_module = importlib.import_module("fastdit.sampling.generate")  # the attribute is the function `generate`

FLOW = build_objective("flow")
CFG_SCALE = 2.0
# Euler on 3 grid points: 2 steps of Δt = 0.5 from noise (t = 0) to data (t = 1).
EULER = dict(sampler="euler", num_steps=3, cfg_scale=CFG_SCALE)
# Roundings on the path from input to velocity of the depth-2 tiny DiT under autocast: each of its 15
# linear layers (patch embedding, 2 of the timestep MLP, 5 per block, 2 of the final layer) rounds its
# weight and its output, each of the 4 attention products (2 per block) its output: 34.
ROUNDINGS = 34


class KeepLatents(PixelSpace):
    """Pixel space that keeps the float latents `generate` decodes, before they become uint8."""

    def decode(self, latents):
        self.latents = latents
        return latents


def tiny_model(depth=2, **fields):
    torch.manual_seed(0)
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=depth, num_classes=10, learn_sigma=False, **fields)
    for p in model.parameters():  # not the all-zero adaLN-Zero init, so outputs are not trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def sample(model, **options):
    """The float32 latents of four guided images, and the largest |velocity| the model returned."""
    largest = []
    hook = model.register_forward_hook(lambda module, args, out: largest.append(out.abs().max().item()))
    space = KeepLatents(3)
    try:
        generate(model, space, [1, 2, 3, 4], options=SamplingOptions(**{**EULER, **options}), objective=FLOW)
    finally:
        hook.remove()
    return space.latents, max(largest)


def euler_error_bound(unit_roundoff: float, largest_velocity: float) -> float:
    """First-order bound on |x − x̃| after the Euler steps when every rounding of the forward errs by
    `unit_roundoff` relative. With weights of std 0.05 and fan-in 128 each layer has gain ≈ 0.6 < 1, so
    an error made at any layer reaches the output no larger, relative to the output's scale: one call
    errs by at most δ = ROUNDINGS · u · max|v|. Guidance s·v_c − (s − 1)·v_u turns δ into (2s − 1)·δ,
    and the 2 steps of Δt = 0.5 add Δt · (2s − 1)·δ each (2 steps, so the feedback of the state's
    error through the model, another factor ≈ gain · Δt, is left out of this first-order count)."""
    per_call = ROUNDINGS * unit_roundoff * largest_velocity
    return 2 * 0.5 * (2 * CFG_SCALE - 1) * per_call


def test_bf16_sampling_gives_float32_latents_within_bf16_rounding_of_fp32():
    model = tiny_model()
    fp32, largest = sample(model)
    bf16, _ = sample(model, precision="bf16")
    assert bf16.dtype == torch.float32
    difference = (bf16 - fp32).abs().max().item()
    # bf16 keeps 8 significant bits: each rounding errs by at most u = 2^-8 relative.
    assert difference <= euler_error_bound(2.0**-8, largest)
    # ... and the option took effect: float32's own rounding (u = 2^-24, e.g. another summation order)
    # cannot move the result this far.
    assert difference > euler_error_bound(2.0**-24, largest)


def test_model_forward_runs_under_bf16_autocast_and_the_sampler_gets_float32():
    model = tiny_model()
    seen = {}

    def record(module, args, output):
        seen["autocast"] = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
        seen["qkv"] = output.dtype

    model.blocks[0].attn.qkv.register_forward_hook(record)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.6]), torch.tensor([1, 2])
    output = in_precision(model, "bf16")(x, t, y)
    assert seen == {"autocast": (True, torch.bfloat16), "qkv": torch.bfloat16}  # the matmuls ran in bf16
    assert model(x, t, y).dtype == torch.float32 and output.dtype == torch.float32  # cast back for the sampler
    assert not torch.is_autocast_enabled("cpu")  # and only for the forward

    model(x, t, y)  # the default changes nothing: fp32 matmuls, no autocast
    assert seen == {"autocast": (False, torch.bfloat16), "qkv": torch.float32}
    assert in_precision(model, "fp32") is model


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="unknown precision 'fp64'; choose one of fp32, bf16, fp16"):
        SamplingOptions(precision="fp64").validate(FLOW)


def test_compiled_blocks_sample_what_eager_samples(monkeypatch):
    eager, _ = sample(tiny_model())
    model = tiny_model()
    names = [name for name, _ in model.named_parameters()]
    counter = CompileCounterWithBackend("aot_eager")  # no C++ compiler needed
    monkeypatch.setattr(generate_module, "compile_blocks", functools.partial(compile_blocks, backend=counter))
    space = KeepLatents(3)
    for _ in range(2):  # the second call compiles nothing new
        generate(model, space, [1, 2, 3, 4], options=SamplingOptions(**EULER), objective=FLOW, compile=True)
    # One graph for both blocks (weights are its inputs), for the one batch shape of guided steps.
    assert counter.frame_count == 1
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert [name for name, _ in model.named_parameters()] == names  # compiled in place: same state dict keys
    # The same float32 operations, perhaps fused or reordered: a few 2^-24 roundings per value, so 1e-5
    # (absolute, on latents of magnitude ≈ 4) covers them with room and is far below bf16's differences.
    torch.testing.assert_close(space.latents, eager, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    model = tiny_model(depth=1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None), objective=FLOW), path)
    return str(path)


SAMPLING = ["--sampler", "euler", "--num-sampling-steps", "3", "--cfg-scale", "1.5", "--device", "cpu", "--no-progress"]
RUN = ["--num-fid-samples", "4", "--chunk-size", "2", "--batch-size", "2", *SAMPLING]


def exit_code(args) -> int:
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


def without_precision(settings_path):
    """Settings as written before --precision existed."""
    settings = json.loads(settings_path.read_text())
    settings["sampling"].pop("precision", None)
    settings_path.write_text(json.dumps(settings))


def test_sample_ddp_records_precision_and_resumes_old_folders_as_fp32(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import fastdit.sample_ddp.runner as runner

    out = tmp_path / "samples.npz"
    command = ["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(out), *RUN]

    def crash(*args, **kwargs):
        raise RuntimeError("stopped while assembling")

    with monkeypatch.context() as patch:  # every chunk sampled, the work folder left as a killed run leaves it
        patch.setattr(runner, "write_adm_npz", crash)
        with pytest.raises(RuntimeError, match="assembling"):
            main(command)
    work_settings = out.with_suffix(".parts") / "settings.json"
    assert json.loads(work_settings.read_text())["sampling"]["precision"] == "fp32"
    capsys.readouterr()

    assert exit_code([*command, "--precision", "bf16"]) == 2  # bf16 images must not join fp32 ones
    assert 'was started with other settings (sampling.precision: "fp32" -> "bf16")' in capsys.readouterr().err

    without_precision(work_settings)  # a folder of an older version: it was fp32, so it resumes
    assert main(command) == 0
    assert "sampled 0 now" in capsys.readouterr().out

    without_precision(out.with_suffix(".json"))  # and its finished result counts as fp32 too
    assert main(command) == 0 and "nothing to do" in capsys.readouterr().out
    assert exit_code([*command, "--precision", "bf16"]) == 2
    assert 'already written with other settings (sampling.precision: "fp32" -> "bf16")' in capsys.readouterr().err


def test_sample_ddp_in_bf16_records_it_and_differs_from_fp32(tiny_ckpt, tmp_path):
    fp32, bf16 = tmp_path / "fp32.npz", tmp_path / "bf16.npz"
    assert main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(fp32), *RUN]) == 0
    assert main(["sample-ddp", "--ckpt", tiny_ckpt, "--out", str(bf16), *RUN, "--precision", "bf16"]) == 0
    assert json.loads(bf16.with_suffix(".json").read_text())["sampling"]["precision"] == "bf16"
    with np.load(fp32) as a, np.load(bf16) as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])


@pytest.mark.parametrize("command, out", [("sample", "grid.png"), ("sample-ddp", "samples.npz")])
def test_compile_flag_compiles_the_blocks(tiny_ckpt, tmp_path, monkeypatch, command, out):
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(generate_module, "compile_blocks", functools.partial(compile_blocks, backend=counter))
    flags = RUN if command == "sample-ddp" else [*SAMPLING, "--class-labels", "1", "2"]
    assert main([command, "--ckpt", tiny_ckpt, "--out", str(tmp_path / out), *flags, "--compile"]) == 0
    assert counter.frame_count == 1  # one graph for the model's block, the same batch shape in every call


@pytest.mark.parametrize("fast_bf16", [False, True])
@pytest.mark.parametrize("command, out", [("sample", "grid.png"), ("sample-ddp", "samples.npz")])
def test_bf16_on_a_slow_cpu_is_warned_in_one_line(tiny_ckpt, tmp_path, monkeypatch, capsys, command, out, fast_bf16):
    import fastdit.precision

    monkeypatch.setattr(fastdit.precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    flags = RUN if command == "sample-ddp" else [*SAMPLING, "--class-labels", "1", "2"]
    assert main([command, "--ckpt", tiny_ckpt, "--out", str(tmp_path / out), *flags, "--precision", "bf16"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    expected = fastdit.precision.precision_warning(torch.device("cpu"), "bf16")
    assert (expected is None) == fast_bf16
    assert warnings == ([] if fast_bf16 else [f"warning: {expected}"])
    assert (tmp_path / out).exists()


@pytest.mark.parametrize("command", ["sample", "sample-ddp"])
def test_precision_flag_takes_only_known_precisions(tiny_ckpt, tmp_path, capsys, command):
    out = tmp_path / ("x.png" if command == "sample" else "x.npz")
    assert exit_code([command, "--ckpt", tiny_ckpt, "--out", str(out), "--precision", "fp64"]) == 2
    err = capsys.readouterr().err
    assert "argument --precision: invalid choice: 'fp64' (choose from" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
