"""Run each row in a fresh process (so its peak memory is its own and no row warms another's caches),
and print the table a row at a time, as each finishes (a run stopped by a time limit keeps the rows it
measured): rates, peak memory, ratios to the reference row at the row's own precision (fp32 rows
against `reference`, bf16 rows against `reference+bf16`, ...: like against like, since mixed precision
is one `torch.autocast` line for a user of the official code too; the reference rows run first) and,
on a GPU, MFU: the model FLOPs of what the step computes (`step_flops`) over the GPU's peak."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import sys

import torch

from ..devices import cpu_flags, cpu_name
from ..objectives import build_objective
from ..train.logger import peak_memory_gb
from .flops import forward_flops_per_image, jvp_flops_per_image, mlp_flops, vit_forward_flops
from .rows import (DINOV2_B14, REPA_PROJECTOR_DIM, Measurement, Row, make_sample_step, make_train_step, reference_name,
                   time_steps)


def measure_row(job: str, row: Row, settings: dict) -> Measurement:
    device = torch.device(settings["device"])
    if job == "train":
        step = make_train_step(row, settings["model"], settings["batch"], settings["latent"], device)
    else:
        step = make_sample_step(row, settings["model"], settings["batch"], settings["latent"], device,
                                settings["cfg_scale"])
    warm, rate = time_steps(step, warmup=settings["warmup"], steps=settings["steps"], device=device)
    return Measurement(rate, peak_memory_gb(device), warm)


def _worker(results, job: str, row: Row, settings: dict) -> None:
    results.put(measure_row(job, row, settings))


def measure_isolated(job: str, row: Row, settings: dict) -> Measurement | str:
    """The row's measurement, or why it has none (out of memory, a crash)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_worker, args=(results, job, row, settings))
    process.start()
    while True:  # a row that dies must not leave the table waiting
        try:
            result = results.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive():
                return f"failed (exit code {process.exitcode}; its traceback is above)"
    process.join()
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = cpu_name()
    flags = cpu_flags()
    extras = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    isa = torch.backends.cpu.get_cpu_capability() + "".join(f", {flag}" for flag in extras)
    return f"{name} ({torch.get_num_threads()} threads, {isa})"


def run_table(job: str, rows: list[Row], settings: dict, *, peak: float | None, out=None) -> dict:
    """Measure every row (the reference rows first) and print its line of the table as soon as it is measured."""
    from ..models import config_from_name

    out = out or sys.stdout
    device = torch.device(settings["device"])
    peak = peak if device.type == "cuda" else None
    config = config_from_name(settings["model"], input_size=settings["latent"], num_classes=1000)
    flops = {row.name: step_flops(job, config, row, settings["batch"]) for row in rows}
    results = {}
    print_header(peak, out)
    for row in [row for row in rows if row.reference] + [row for row in rows if not row.reference]:
        results[row.name] = measure_isolated(job, row, settings)
        print_row(row, rows, results, settings["batch"], flops[row.name], peak, out)
        out.flush()
    return results


def step_flops(job: str, config, row: Row, batch: int, objective=None) -> float:
    """The model FLOPs of one step of `row` on `batch` images: what the step computes, recomputation
    under checkpointing not counted. Sampling: the guided forward on the doubled batch. Training: forward
    and backward (3 forwards' worth; the routed blocks on their kept tokens), and what else the step
    runs: MeanFlow's target (a JVP, primal and tangent, on the share of samples with r != t, and the
    no-grad forwards of a guided target), REPA's frozen encoder (forward) and projector (forward and
    backward). `objective`: the row's objective with its settings (default: the objective's defaults; a
    training preset's MeanFlow guides its target, which costs forwards)."""
    if job != "train":
        return 2.0 * batch * forward_flops_per_image(config)
    per_image = 3 * row_forward_flops(config, row)
    objective = objective if objective is not None else build_objective(row.objective)
    if row.objective == "meanflow":
        guided = objective.trained_guidance is not None or objective.meanflow_guidance_input
        no_grad_forwards = (2 if objective.meanflow_kappa else 1) if guided else 0
        if objective.meanflow_v_loss:  # the tangent u(z, t, t), on the r != t samples
            no_grad_forwards += objective.meanflow_ratio
        per_image += objective.meanflow_ratio * jvp_flops_per_image(config)
        per_image += no_grad_forwards * forward_flops_per_image(config)
    if row.repa:
        shape = DINOV2_B14
        per_image += vit_forward_flops(image_size=shape["image_size"], patch=shape["patch"], width=shape["width"],
                                       depth=shape["depth"], mlp=shape["mlp"])
        widths = [config.hidden_size, REPA_PROJECTOR_DIM, REPA_PROJECTOR_DIM, shape["width"]]
        per_image += 3 * mlp_flops(config.grid_size**2, widths)
    return float(batch * per_image)


def row_forward_flops(config, row: Row) -> float:
    """The model FLOPs of one image's forward in `row`: fewer where tokens are routed (TREAD's span
    and rate, as `fastdit train --route` sets them by default)."""
    if not row.route:
        return forward_flops_per_image(config)
    from ..train.extensions.routing import PAPER_RATE, PAPER_SPAN, kept_tokens, resolve_span

    return forward_flops_per_image(config, routed_span=resolve_span(PAPER_SPAN, config.depth),
                                   kept_tokens=kept_tokens(config.grid_size**2, PAPER_RATE))


def same_precision_reference(row: Row, rows: list[Row], results: dict) -> Measurement | str:
    """The measured reference row at `row`'s precision, or why there is none (a table cell)."""
    wanted = reference_name(row.precision)
    for other in rows:
        if other.reference and other.precision == row.precision:
            result = results.get(other.name)
            return result if isinstance(result, Measurement) else f"({wanted} failed)"
    return f"(no {wanted} row)"


COLUMNS = ["row", "steps/s", "images/s", "peak GB", "speed vs reference (same precision)",
           "memory vs reference (same precision)"]


def print_header(peak: float | None, out) -> None:
    columns = COLUMNS + (["MFU"] if peak else []) + ["warm-up s"]
    print("| " + " | ".join(columns) + " |", file=out)
    print("|" + "---|" * len(columns), file=out)


def print_row(row: Row, rows: list[Row], results: dict, batch: int, flops_per_step: float, peak: float | None, out) -> None:
    result = results[row.name]
    if not isinstance(result, Measurement):
        print(f"| {row.name} | {result} |", file=out)
        return
    reference = same_precision_reference(row, rows, results)
    if isinstance(reference, Measurement):
        speed = f"{result.steps_per_second / reference.steps_per_second:.2f}x"
        memory = f"{result.peak_gb / reference.peak_gb:.2f}x"
    else:  # never a ratio across precisions: say which row is missing
        speed = memory = reference
    cells = [row.name, f"{result.steps_per_second:.3f}", f"{result.steps_per_second * batch:.2f}",
             f"{result.peak_gb:.2f}", speed, memory]
    if peak:
        cells.append(f"{100 * result.steps_per_second * flops_per_step / (peak * 1e12):.1f}%")
    cells.append(f"{result.compile_seconds:.1f}")
    print("| " + " | ".join(cells) + " |", file=out)


def print_table(rows: list[Row], results: dict, batch: int, flops_per_step: dict, peak: float | None, out) -> None:
    print_header(peak, out)
    for row in rows:
        print_row(row, rows, results, batch, flops_per_step[row.name], peak, out)
