"""`fastdit bench`: row names, the FLOP count behind MFU, and the table on a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fastdit.bench.flops import forward_flops_per_image, peak_tflops
from fastdit.bench.rows import Row, parse_row
from fastdit.cli import main
from fastdit.errors import UserError
from fastdit.models import LIGHTNINGDIT_BLOCKS, build_model, config_from_name


def test_row_names_become_options():
    assert parse_row("reference", training=True) == Row("reference", reference=True)
    assert parse_row("reference+bf16", training=False) == Row("reference+bf16", reference=True, precision="bf16")
    assert parse_row("reference+fp16", training=True).precision == "fp16"
    assert parse_row("fastdit+bf16+route", training=True) == Row("fastdit+bf16+route", precision="bf16", route=True)
    assert parse_row("fastdit", training=True) == Row("fastdit")
    assert parse_row("fastdit+bf16+compile+ckpt", training=True) == Row(
        "fastdit+bf16+compile+ckpt", precision="bf16", compile=True, checkpointing="blocks")
    assert parse_row("fastdit+ckpt-mlp", training=True).checkpointing == "mlp"
    assert parse_row("fastdit+ckpt-every-3", training=True).checkpointing == "every-3"
    assert parse_row("fastdit+bf16+repa", training=True) == Row("fastdit+bf16+repa", precision="bf16", repa=True)
    assert parse_row("fastdit+meanflow", training=True).objective == "meanflow"


def test_the_repa_row_aligns_with_an_encoder_of_dinov2_b14s_cost():
    import torch

    from fastdit.bench.rows import dinov2_sized_alignment
    from fastdit.models import build_model
    from fastdit.train.config import TrainConfig

    model = build_model("DiT-S/2", input_size=4, num_classes=10)
    alignment = dinov2_sized_alignment(model, TrainConfig.create(), torch.device("cpu"))
    encoder = alignment.encoder
    # DINOv2-B/14 at 224 px: 16x16 patch tokens of width 768 (the class token dropped), about 86M weights.
    assert (encoder.resolution, encoder.grid, encoder.dim) == (224, 16, 768)
    assert 85e6 < sum(p.numel() for p in encoder.parameters()) < 88e6
    assert alignment.depth == 4 and alignment.weight == 0.5  # REPA's for models of B's depth


@pytest.mark.parametrize("name, training", [("fastdit+bf61", True), ("official", True), ("fastdit+ckpt", False),
                                            ("fastdit+ckpt-every-0", True), ("reference+compile", True),
                                            ("reference+bf16+fp16", True), ("fastdit+route", False)])
def test_unknown_rows_are_refused_with_the_options(name, training):
    with pytest.raises(UserError, match="row"):
        parse_row(name, training=training)


@pytest.mark.parametrize("blocks", [{}, LIGHTNINGDIT_BLOCKS], ids=["official", "lightningdit"])
def test_flop_formula_counts_what_torch_counts(blocks):
    # The formula must equal torch's own count of the forward's matmuls, convolutions and attention.
    # Attention runs through the math backend, whose two batched products torch counts (it does not
    # count the CPU flash kernel).
    model = build_model("DiT-T/2", input_size=8, num_classes=10, **blocks).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2])
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, t, y)
    assert forward_flops_per_image(model.config) * 3 == counter.get_total_flops()


def test_routed_flop_formula_counts_what_torch_counts():
    # The routed forward: blocks[1:3] of 4 on 5 of the 16 tokens, counted by torch the same way.
    from fastdit.models.routing import TokenRoute

    model = build_model("DiT-T/2", input_size=8, num_classes=10, depth=4).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2])
    route = TokenRoute(torch.tensor([[0, 3, 7, 8, 15]] * 3), 1, 3)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, t, y, route=route)
    routed = forward_flops_per_image(model.config, routed_span=(1, 3), kept_tokens=5)
    assert routed * 3 == counter.get_total_flops()
    assert routed < forward_flops_per_image(model.config)


def test_ratios_are_against_the_reference_of_the_same_precision():
    import io

    from fastdit.bench.rows import Measurement
    from fastdit.bench.table import print_table

    names = ["reference", "reference+bf16", "fastdit", "fastdit+bf16", "fastdit+fp16"]
    rows = [parse_row(name, training=True) for name in names]
    results = {"reference": Measurement(1.0, 2.0, 0.0), "reference+bf16": Measurement(2.0, 1.0, 0.0),
               "fastdit": Measurement(1.5, 2.0, 0.0), "fastdit+bf16": Measurement(3.0, 0.5, 0.0),
               "fastdit+fp16": Measurement(4.0, 0.5, 0.0)}
    out = io.StringIO()
    print_table(rows, results, 8, {name: 1.0 for name in names}, None, out)
    table = _table(out.getvalue())
    assert table["fastdit"][3:5] == ["1.50x", "1.00x"]  # against reference (fp32)
    assert table["fastdit+bf16"][3:5] == ["1.50x", "0.50x"]  # against reference+bf16, not 3.00x against fp32
    assert table["reference+bf16"][3:5] == ["1.00x", "1.00x"]
    assert table["fastdit+fp16"][3:5] == ["(no reference+fp16 row)"] * 2  # no ratio across precisions


def test_dit_xl_2_costs_the_papers_flops():
    # DiT Table 4: DiT-XL/2 at 256 is 118.6 Gflops of multiply-adds, i.e. 237.2 GFLOP; the paper rounds to 0.1.
    flops = forward_flops_per_image(config_from_name("DiT-XL/2", input_size=32))
    assert abs(flops / 2e9 - 118.6) < 0.05


def test_peak_is_looked_up_by_the_most_specific_name():
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA GeForce GTX 1080") is None


def _table(output: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.mark.parametrize("job, rows", [("train", ["reference", "reference+bf16", "fastdit", "fastdit+ckpt-mlp",
                                                 "fastdit+meanflow", "fastdit+route", "fastdit+bf16+route"]),
                                       ("sample", ["reference", "reference+bf16", "fastdit", "fastdit+bf16"])])
def test_bench_prints_each_row_against_the_reference(job, rows, capsys):
    status = main(["bench", job, "--model", "DiT-T/2", "--image-size", "64", "--batch", "2", "--device", "cpu",
                   "--warmup", "1", "--steps", "1", "--rows", *rows])
    assert status == 0
    table = _table(capsys.readouterr().out)
    assert list(table) == rows
    assert table["reference"][3:5] == table["reference+bf16"][3:5] == ["1.00x", "1.00x"]
    for cells in table.values():
        rate, images, peak = (float(cell) for cell in cells[:3])
        assert rate > 0 and images == pytest.approx(2 * rate, abs=0.01) and peak > 0


def test_a_bad_row_is_one_line_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "train", "--rows", "fastdit+turbo", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "unknown option 'turbo'" in capsys.readouterr().err


def test_batch_zero_is_an_error_not_the_default_batch(capsys):
    # `--batch 0` used to read as "not given" and run with the default batch of 8.
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "sample", "--model", "DiT-T/2", "--image-size", "64", "--batch", "0", "--device", "cpu",
              "--warmup", "0", "--steps", "1", "--rows", "fastdit"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--batch and --steps must be at least 1" in err and "Traceback" not in err


def test_jvp_flop_formula_counts_what_torch_counts():
    # MeanFlow's target is a forward-mode JVP along (z, t): torch runs the primal and, for the tangent, two
    # products per matmul (one of them with the weight's zero tangent): three forwards, as its counter says.
    from fastdit.bench.flops import jvp_flops_per_image

    model = build_model("DiT-T/2", input_size=8, num_classes=10).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 2])
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        torch.func.jvp(lambda x_, t_: model(x_, t_, y), (x, t), (torch.ones_like(x), torch.ones_like(t)))
    assert jvp_flops_per_image(model.config) * 3 == counter.get_total_flops()


def test_mfu_counts_what_the_step_computes():
    """A MeanFlow step adds its JVP on the r != t share; a REPA step its DINOv2-B/14-sized encoder
    (46 GFLOP per 224-px image: 23 G multiply-adds) and its projector; sampling the doubled batch."""
    from fastdit.bench.flops import jvp_flops_per_image, vit_forward_flops
    from fastdit.bench.rows import DINOV2_B14
    from fastdit.bench.table import step_flops

    config = config_from_name("DiT-XL/2", input_size=32, num_classes=1000)
    forward = forward_flops_per_image(config)
    plain = step_flops("train", config, parse_row("fastdit+bf16", training=True), 32)
    assert plain == 32 * 3 * forward
    assert step_flops("sample", config, parse_row("fastdit", training=False), 32) == 2 * 32 * forward
    meanflow = step_flops("train", config, parse_row("fastdit+meanflow", training=True), 32)
    assert meanflow == pytest.approx(plain + 32 * 0.25 * jvp_flops_per_image(config))  # the paper's ratio: 1 in 4
    encoder = vit_forward_flops(**{k: DINOV2_B14[k] for k in ("image_size", "patch", "width", "depth", "mlp")})
    assert 45e9 < encoder < 47e9
    repa = step_flops("train", config, parse_row("fastdit+repa", training=True), 32)
    projector = 3 * 2 * 256 * (1152 * 2048 + 2048 * 2048 + 2048 * 768)
    assert repa == pytest.approx(plain + 32 * (encoder + projector))


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
    ("NVIDIA H800", 989.0), ("NVIDIA H800 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA B200", 2250.0), ("NVIDIA GeForce GTX 1080", None),
])
def test_peaks_of_the_data_center_gpus(name, peak):
    assert peak_tflops(name) == peak


def test_rows_stream_as_they_finish_with_the_reference_first(monkeypatch):
    """Each row's line is printed when it is measured (a step stopped by its time limit keeps them), the
    reference rows first so every ratio can be printed at once."""
    import io

    import fastdit.bench.table as table
    from fastdit.bench.rows import Measurement

    out = io.StringIO()
    lines_when_measured = []

    def measure(job, row, settings):
        lines_when_measured.append((row.name, out.getvalue().count("\n")))
        return Measurement(2.0 if row.reference else 3.0, 1.0, 0.0)

    monkeypatch.setattr(table, "measure_isolated", measure)
    rows = [parse_row(name, training=True) for name in ("fastdit+bf16", "reference+bf16", "fastdit")]
    settings = dict(device="cpu", model="DiT-T/2", batch=2, latent=8, warmup=0, steps=1, cfg_scale=None)
    table.run_table("train", rows, settings, peak=None, out=out)
    assert lines_when_measured == [("reference+bf16", 2), ("fastdit+bf16", 3), ("fastdit", 4)]
    body = _table(out.getvalue())
    assert list(body) == ["reference+bf16", "fastdit+bf16", "fastdit"]
    assert body["fastdit+bf16"][3] == "1.50x" and body["fastdit"][3] == "(no reference row)"


def test_models_are_built_on_the_device(monkeypatch):
    """DiT-XL/2 initialised on the CPU and then moved took longer than a row's measurement on a GPU."""
    import fastdit.models
    from fastdit.bench.rows import make_sample_step

    devices = []
    build = fastdit.models.build_model

    def recording_build(*args, **kwargs):
        devices.append(torch.get_default_device())
        return build(*args, **kwargs)

    monkeypatch.setattr(fastdit.models, "build_model", recording_build)
    make_sample_step(parse_row("fastdit", training=False), "DiT-T/2", 2, 8, torch.device("meta"), 4.0)
    assert devices == [torch.device("meta")]
