"""`make gpu-check` (benchmarks/gpu_check.sh): its CPU-safe parts, argument checks, the refusal without
a CUDA device, the dry run, and the report writer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdit.bench.gpu_check import main as gpu_check_main
from fastdit.bench.gpu_check import read_steps, render_report

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_script(*args, cwd):
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("args, message", [
    (["--turbo"], "gpu_check: unknown argument '--turbo'"),
    (["--out"], "gpu_check: --out needs a value"),
    (["--out", "/nonexistent-folder/report.md"], "'/nonexistent-folder' is not a writable folder"),
])
def test_bad_arguments_are_one_line_with_exit_2(tmp_path, args, message):
    result = run_script(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_nothing_runs(tmp_path):
    result = run_script("--work", str(tmp_path / "work"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "nothing was run" in result.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "gpu-check-report.md").exists()


def test_a_dry_run_writes_the_report_of_every_step_not_run(tmp_path):
    result = run_script("--dry-run", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "report.md"),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    names = ["gpu-tests", "bench-train", "bench-sample", "memory-xl-batch32-ckpt", "stand-ins", "train-25-steps",
             "train-resume-to-50", "sample-ddp-256"]
    for number, name in enumerate(names, 1):
        assert f"| {number} | {name} | not run |" in report
    assert "0 of 8 steps passed" in report
    # The steps, as commands: the gpu tests, both bench jobs on DiT-XL/2 at 256, batch 32 with
    # checkpointing, compiled bf16 training to 50 with a resume, and 256 images of sample-ddp.
    assert "-m pytest -q -rs -m gpu tests" in report
    assert "bench train --device cuda --model DiT-XL/2 --image-size 256" in report
    assert "--batch 32 --rows fastdit+ckpt fastdit+bf16+ckpt" in report
    assert report.count("--precision bf16 --compile") == 2 and "--max-steps 50" in report
    assert "sample-ddp" in report and "--num-fid-samples 256" in report


def write_step(steps: Path, number: int, name: str, command: str, status: str | None, log: str = "") -> None:
    stem = steps / f"{number:02d}-{name}"
    stem.with_suffix(".cmd").write_text(command + "\n")
    if status is not None:
        stem.with_suffix(".status").write_text(status + "\n")
    if log:
        stem.with_suffix(".log").write_text(log)


def test_the_report_names_each_outcome_and_keeps_the_numbers(tmp_path):
    steps = tmp_path / "steps"
    steps.mkdir()
    (tmp_path / "device.txt").write_text("NVIDIA H200, 143771 MiB\ntorch 2.13.0, CUDA 12.8\n")
    bench = ("training step: DiT-XL/2 at 256px, batch 32, on NVIDIA H200\n| row | steps/s |\n|---|---|\n"
             "| reference | 1.000 |\n| fastdit+bf16 | 3.000 |\n")
    write_step(steps, 1, "gpu-tests", "pytest -m gpu", "0 12.5", "3 passed in 10s\n")
    write_step(steps, 2, "bench-train", "fastdit bench train", "0 140.0", bench)
    write_step(steps, 3, "bench-sample", "fastdit bench sample", "124 60.0", "warming up\n" * 40 + "last words\n")
    write_step(steps, 4, "train-25-steps", "fastdit train", "1 5.0", "Traceback\nRuntimeError: boom\n")
    write_step(steps, 5, "sample-ddp-256", "fastdit sample-ddp", "skipped no step-50 export")
    write_step(steps, 6, "later", "echo", None)
    report = render_report(tmp_path, read_steps(tmp_path))
    assert "Machine: NVIDIA H200, 143771 MiB" in report
    assert "2 of 6 steps passed, 218 s of step time." in report
    assert "| 1 | gpu-tests | passed | 12.5 | `pytest -m gpu` |" in report
    assert "| 3 | bench-sample | timed out (its limit reached) | 60.0 |" in report
    assert "| 4 | train-25-steps | failed (exit 1) | 5.0 |" in report
    assert "| 5 | sample-ddp-256 | skipped (no step-50 export) |  |" in report
    assert "| 6 | later | not run |  |" in report
    assert "| fastdit+bf16 | 3.000 |" in report and "training step: DiT-XL/2" in report  # the bench's table kept
    assert "RuntimeError: boom" in report and "last words" in report  # the tails of the steps that failed
    assert report.count("warming up") <= 30  # a tail, not the whole log


def test_the_report_command_writes_atomically_and_refuses_a_missing_work_folder(tmp_path, capsys):
    assert gpu_check_main(["report", str(tmp_path / "nowhere"), str(tmp_path / "r.md")]) == 2
    assert "does not exist: run benchmarks/gpu_check.sh" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
    (tmp_path / "steps").mkdir()
    write_step(tmp_path / "steps", 1, "gpu-tests", "pytest", "0 1.0", "1 passed\n")
    assert gpu_check_main(["report", str(tmp_path), str(tmp_path / "r.md")]) == 0
    assert "1 of 1 steps passed" in (tmp_path / "r.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_make_gpu_check_runs_the_script():
    makefile = (REPO / "Makefile").read_text()
    assert "gpu-check:" in makefile and "benchmarks/gpu_check.sh" in makefile
