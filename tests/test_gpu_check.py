"""`make gpu-check` (benchmarks/gpu_check.sh): its CPU-safe parts, argument checks, the refusal without
a CUDA device, the dry run, and the report writer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdit.bench.gpu_check import driver_advice, read_steps, render_report
from fastdit.bench.gpu_check import main as gpu_check_main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_script(*args, cwd):
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("args, message", [
    (["--turbo"], "gpu_check: unknown argument '--turbo'"),
    (["--out"], "gpu_check: --out needs a value"),
    (["--out", "/nonexistent-folder/report.md"], "'/nonexistent-folder' is not a writable folder"),
    (["--budget", "7m"], "gpu_check: --budget must be a whole number of seconds, got '7m'"),
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
    assert result.stderr.count("\n") == 1 and "nothing was run" in result.stderr
    # This CPU machine's torch: the line says which build it is and what to install instead.
    expected = "is a CPU-only build; install a CUDA build of torch" if torch.version.cuda is None else "no CUDA device"
    assert expected in result.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "gpu-check-report.md").exists()


STEPS = ["gpu-tests", "stand-ins", "train-10-steps", "train-resume-to-20", "sample-ddp", "ddp-2-gpus",
         "bench-fast-batch256", "bench-like-for-like", "bench-meanflow-repa"]


def test_a_dry_run_writes_the_report_of_every_step_not_run(tmp_path):
    result = run_script("--dry-run", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "report.md"),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    for number, name in enumerate(STEPS, 1):
        assert f"| {number} | {name} | not run |" in report
    assert "0 of 9 steps passed, 0 s of step time of a 420-s budget." in report
    # The list, as commands: the gpu tests; a compiled bf16 run with a resume; sample-ddp on every
    # visible GPU (up to 2); a 2-process DDP step; DiT-XL/2 256 at the fast settings, batch 256 with
    # checkpointing; the like-for-like rows; a compiled MeanFlow and a REPA step.
    assert "-m pytest -q -rs -m gpu tests" in report
    assert report.count("--precision bf16 --compile") == 3 and "--max-steps 10" in report and "--max-steps 20" in report
    assert "-m torch.distributed.run --standalone --nproc_per_node 1 -m fastdit sample-ddp" in report
    assert "--nproc_per_node 2 -m fastdit train" in report
    assert "--batch 256 --warmup 2 --steps 3 --rows fastdit+bf16+compile+ckpt" in report
    assert "--rows reference reference+bf16 fastdit+bf16+compile`" in report
    assert "--rows fastdit+bf16+compile+meanflow fastdit+bf16+compile+repa`" in report
    # The planned limits, printed with the plan, fit the budget's worst case only as far as the budget cuts them.
    limits = [int(line.split("(limit ")[1].split("s)")[0]) for line in result.stdout.splitlines() if "(limit " in line]
    assert len(limits) == 9 and max(limits) <= 100
    # It ends with what did not run and why, and the same facts are in JSON beside it.
    assert report.rstrip().splitlines()[-1].startswith("- bench-meanflow-repa: not run; its rows: fastdit+bf16+compile+meanflow")
    data = json.loads((tmp_path / "report.json").read_text())
    assert [step["name"] for step in data["steps"]] == STEPS and data["budget_seconds"] == 420
    assert [item["step"] for item in data["not_run"]] == STEPS


# A stand-in interpreter for the script: fastdit's own helpers (the report) run for real; every step
# succeeds at once except the bench, which prints its first row, then hangs past any limit.
FAKE_PYTHON = """#!/bin/bash
case "$*" in
  *"gpu_check report"*|*"import fastdit"*) exec "$REAL_PYTHON" "$@" ;;
  *"gpu_check doctor"*) echo "a CUDA device is usable" ;;
  *torch.__version__*) echo "torch (fake), built for CUDA 13.0; 1 GPU(s) visible" ;;
  *device_count*) echo 1 ;;
  *"bench train"*)
    words="$*"
    rows="${words##*--rows }"
    echo "training step: DiT-XL/2 at 256px, batch 256, on a fake GPU"
    echo "| row | steps/s | images/s | peak GB | speed vs reference (same precision) | memory vs reference (same precision) | MFU | warm-up s |"
    echo "|---|---|---|---|---|---|---|---|"
    echo "| ${rows%% *} | 1.500 | 384.00 | 41.20 | (no reference+bf16 row) | (no reference+bf16 row) | 58.4% | 61.0 |"
    exec sleep 300 ;;
  *) echo "ran: $*" ;;
esac
"""


def test_the_budget_cuts_a_step_that_hangs_keeps_its_rows_and_skips_what_is_left(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(SCRIPT), "--python", str(fake), "--budget", "25", "--work", str(tmp_path / "work"),
                             "--out", str(tmp_path / "report.md")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "REAL_PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    # The row was on the console while the step still ran (streamed), and the report keeps it.
    assert "    | fastdit+bf16+compile+ckpt | 1.500 | 384.00 | 41.20 |" in result.stdout
    data = json.loads((tmp_path / "report.json").read_text())
    outcome = {step["name"]: step["outcome"] for step in data["steps"]}
    assert all(outcome[name] == "passed" for name in STEPS[:5])
    assert outcome["ddp-2-gpus"] == "skipped (one GPU visible)"
    assert outcome["bench-fast-batch256"].startswith("timed out (its limit reached at ")
    assert data["machine"] == "torch (fake), built for CUDA 13.0; 1 GPU(s) visible"
    assert outcome["bench-like-for-like"] == outcome["bench-meanflow-repa"] == "skipped (no time left of the 25-s budget)"
    [fast] = [step for step in data["steps"] if step["name"] == "bench-fast-batch256"]
    assert fast["rows"] == [{"row": "fastdit+bf16+compile+ckpt", "steps/s": "1.500", "images/s": "384.00", "peak GB": "41.20",
                             "speed vs reference (same precision)": "(no reference+bf16 row)",
                             "memory vs reference (same precision)": "(no reference+bf16 row)", "MFU": "58.4%",
                             "warm-up s": "61.0"}]
    assert sum(step["seconds"] or 0 for step in data["steps"]) <= 25
    report = (tmp_path / "report.md").read_text()
    assert report.index("## What did not run, and why") > report.index("| fastdit+bf16+compile+ckpt | 1.500")
    assert "- bench-like-for-like: skipped (no time left of the 25-s budget); its rows: reference, reference+bf16" in report


@pytest.mark.parametrize("torch_cuda, driver, words", [
    ("13.0", "570.86.15", "built for CUDA 13.0, which needs NVIDIA driver 580.65.6 or newer, and this machine has 570.86.15"),
    ("12.8", "535.104.05", None), ("13.0", "580.82.07", None), ("12.8", "470.57.02", "needs NVIDIA driver 525.60.13"),
    (None, "580.82.07", "is a CPU-only build; install a CUDA build of torch"),
])
def test_the_doctor_names_a_driver_too_old_for_the_torch_build(torch_cuda, driver, words):
    advice = driver_advice("2.13.0", torch_cuda, driver)
    assert advice is None if words is None else words in advice


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
    assert "| 1 | gpu-tests | passed | 12.5 |  | `pytest -m gpu` |" in report
    assert "| 3 | bench-sample | timed out (its limit reached) | 60.0 |" in report
    assert "| 4 | train-25-steps | failed (exit 1) | 5.0 |" in report
    assert "| 5 | sample-ddp-256 | skipped (no step-50 export) |  |" in report
    assert "| 6 | later | not run |  |" in report
    assert report.rstrip().endswith("- later: not run")
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
    assert json.loads((tmp_path / "r.json").read_text())["not_run"] == []
    assert "Everything ran." in (tmp_path / "r.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_make_gpu_check_runs_the_script():
    makefile = (REPO / "Makefile").read_text()
    assert "gpu-check:" in makefile and "benchmarks/gpu_check.sh" in makefile
