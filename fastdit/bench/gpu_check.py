"""The Python half of `benchmarks/gpu_check.sh` (`make gpu-check`): the stand-ins its steps need, the
one-line diagnosis when no GPU can be used, and the report it writes.

    python -m fastdit.bench.gpu_check doctor [--driver VERSION]  # exit 1 with one line when CUDA is unusable
    python -m fastdit.bench.gpu_check prepare WORK                 # WORK/vae and WORK/store (random, no download)
    python -m fastdit.bench.gpu_check report WORK OUT              # OUT (markdown) and OUT's .json from WORK/steps

`prepare` writes an AutoencoderKL of the SD VAE's shape with random weights (a diffusers folder, what
`--vae FOLDER` loads) and a latent store of random VAE moments at 256 px that names that folder: the
check trains and samples DiT-XL/2 with the real code paths and real shapes, and downloads nothing.

The shell script runs each step under a time limit and leaves, per step, `WORK/steps/NN-name.cmd` (the
command), `NN-name.log` (its output), `NN-name.limit` (its limit in seconds) and `NN-name.status`
("EXIT SECONDS", or "skipped REASON"); `report` reads them and writes one markdown file and the same
facts as JSON: the machine, a table of the steps, the bench rows the steps printed (each row is printed
as soon as it is measured, so a step stopped by its limit keeps the rows it finished), the tail of the
log of every step that did not pass, and last what did not run and why: steps skipped, stopped,
failed or never reached, and bench rows asked for and not measured.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_text

TIMED_OUT = (124, 137)  # timeout(1)'s exit on its limit, and on the KILL after it
LOG_TAIL_LINES = 30
STORE_ITEMS = 256
STORE_CLASSES = 1000
STORE_IMAGE_SIZE = 256
SD_VAE_CONFIG = {  # the SD VAE's shape (kl-f8): 4 latent channels, 8x downsampling
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 256,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_STEP_FILE = re.compile(r"(\d+)-([A-Za-z0-9_.-]+)\.cmd")
_LATER_LINES = re.compile(r"(peak|resuming|saved|images/s|img/s|steps/s|passed|failed|skipped|error)", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# doctor
# ----------------------------------------------------------------------------------------------

# The oldest Linux driver each CUDA major version of a torch build runs on (NVIDIA's CUDA compatibility
# guide: CUDA 12.x runs on R525 and newer through minor-version compatibility; CUDA 13.x needs R580).
MIN_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def driver_advice(torch_version: str, torch_cuda: str | None, driver: str | None) -> str | None:
    """Why this torch cannot use this driver (None where it can, or where that cannot be told)."""
    if torch_cuda is None:
        return (f"torch {torch_version} is a CPU-only build; install a CUDA build of torch (README: Benchmarks, "
                "\"which torch\")")
    needed = MIN_DRIVER.get(_version(torch_cuda)[0])
    if not driver or needed is None or _version(driver) >= needed:
        return None
    return (f"torch {torch_version} is built for CUDA {torch_cuda}, which needs NVIDIA driver "
            f"{'.'.join(map(str, needed))} or newer, and this machine has {driver}; install a torch built for "
            "an older CUDA (README: Benchmarks, \"which torch\") or update the driver")


def doctor(driver: str | None) -> str | None:
    """None when a CUDA device is usable, else one line saying why not."""
    import torch

    if torch.cuda.is_available():
        return None
    advice = driver_advice(torch.__version__, torch.version.cuda, driver)
    if advice:
        return advice
    if not driver:
        return "no CUDA device (torch.cuda.is_available() is False, and nvidia-smi finds no driver); this check needs one NVIDIA GPU"
    return (f"no CUDA device (torch.cuda.is_available() is False with driver {driver}: CUDA_VISIBLE_DEVICES, "
            "or the GPU is in use by another container); this check needs one NVIDIA GPU")


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------


def prepare(work: Path, *, items: int = STORE_ITEMS, image_size: int = STORE_IMAGE_SIZE, seed: int = 0) -> Path:
    """WORK/vae (random SD-VAE-sized AutoencoderKL) and WORK/store (random moments of `items` images)."""
    import torch
    from diffusers import AutoencoderKL

    from ..data.latent_store import StorePlan, finalize_store, open_for_writing, write_shard

    torch.manual_seed(seed)
    vae_dir = work / "vae"
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(vae_dir)
    side = image_size // 8
    plan = StorePlan(vae=str(vae_dir.resolve()), scale_factor=0.18215, image_size=image_size,
                     latent_shape=(4, side, side), dtype="float16", shard_size=128, num_sources=items,
                     class_names=[f"class-{k}" for k in range(STORE_CLASSES)], files_digest="gpu-check")
    store = work / "store"
    open_for_writing(store, plan)
    generator = torch.Generator().manual_seed(seed)
    for shard in range(plan.num_shards):
        sources = plan.shard_sources(shard)
        n = len(sources)
        # (n, 2, C, h, w): the moments of each image and of its horizontal flip
        mean = torch.randn(n, 2, *plan.latent_shape, generator=generator).half()
        std = (0.1 * torch.rand(n, 2, *plan.latent_shape, generator=generator)).half()
        label = torch.randint(0, STORE_CLASSES, (n,), generator=generator)
        write_shard(store, shard, mean=mean, std=std, label=label, source=torch.tensor(list(sources)), skipped=[])
    finalize_store(store, plan)
    return store


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


@dataclass
class Step:
    number: int
    name: str
    command: str
    outcome: str  # passed | failed (exit N) | timed out ... | skipped (...) | not run
    seconds: float | None
    log: list[str]
    limit: float | None = None  # the time limit it ran under
    tables: list[dict] = field(default_factory=list)  # the bench tables it printed: {"columns", "rows"}

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"

    def asked_rows(self) -> list[str]:
        """The bench rows its command asked for (--rows ...), in order; [] for other steps."""
        words = shlex.split(self.command)
        if "--rows" not in words:
            return []
        asked = []
        for word in words[words.index("--rows") + 1:]:
            if word.startswith("--"):
                break
            asked.append(word)
        return asked

    def measured_rows(self) -> dict[str, dict]:
        return {row["row"]: row for table in self.tables for row in table["rows"]}


def read_tables(log: list[str]) -> list[dict]:
    """The markdown tables in a log: {"columns": [...], "rows": [{column: cell}]}, a row with fewer cells
    (a row that failed: "| name | why |") keeping the cells it has."""
    tables, block = [], []
    for line in [*log, ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2:
            columns, rows = block[0], [cells for cells in block[1:] if not set("".join(cells)) <= set("-: ")]
            tables.append({"columns": columns, "rows": [dict(zip(columns, cells)) for cells in rows]})
        block = []
    return tables


def read_step(steps_dir: Path, cmd_file: Path) -> Step:
    match = _STEP_FILE.fullmatch(cmd_file.name)
    stem = cmd_file.name[: -len(".cmd")]
    log_file, status_file, limit_file = (steps_dir / f"{stem}{suffix}" for suffix in (".log", ".status", ".limit"))
    log = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
    limit = float(limit_file.read_text()) if limit_file.is_file() and limit_file.read_text().strip().isdigit() else None
    outcome, seconds = "not run", None
    if status_file.is_file():
        words = status_file.read_text().split()
        if words and words[0] == "skipped":
            outcome = "skipped (" + " ".join(words[1:]) + ")"
        elif len(words) == 2 and words[0].lstrip("-").isdigit():
            code, seconds = int(words[0]), float(words[1])
            reached = f" at {limit:g} s" if limit is not None else ""
            outcome = ("passed" if code == 0 else f"timed out (its limit reached{reached})" if code in TIMED_OUT
                       else f"failed (exit {code})")
        else:
            outcome = f"unreadable status {' '.join(words)!r}"
    return Step(int(match[1]) if match else 0, match[2] if match else stem, cmd_file.read_text().strip(),
                outcome, seconds, log, limit, read_tables(log))


def read_steps(work: Path) -> list[Step]:
    steps_dir = work / "steps"
    if not steps_dir.is_dir():
        raise UserError(f"{str(steps_dir)!r} does not exist: run benchmarks/gpu_check.sh (it writes the steps), "
                        f"or give the work folder it used")
    return sorted((read_step(steps_dir, path) for path in steps_dir.glob("*.cmd")), key=lambda s: s.number)


def not_run(steps: list[Step]) -> list[dict]:
    """What did not run and why: every step that did not pass, and every bench row asked for that has no
    measurement (the step stopped before it, or the row failed)."""
    missing = []
    for step in steps:
        ran = step.seconds is not None
        if not step.passed:
            rows = step.asked_rows()
            missing.append({"step": step.name, "why": step.outcome + ("" if ran or not rows else f"; its rows: {', '.join(rows)}")})
        if not ran:
            continue
        measured = step.measured_rows()
        for row in step.asked_rows():
            result = measured.get(row)
            if result is None:
                missing.append({"step": step.name, "row": row, "why": "not measured: the step ended before it"})
            elif "steps/s" not in result:  # "| row | failed (...) |"
                missing.append({"step": step.name, "row": row, "why": next(iter(list(result.values())[1:]), "failed")})
    return missing


def report_data(work: Path, steps: list[Step]) -> dict:
    """The report as JSON: machine, budget, steps (with their bench rows), and what did not run."""
    device = (work / "device.txt").read_text().strip() if (work / "device.txt").is_file() else None
    budget = (work / "budget.txt").read_text().strip() if (work / "budget.txt").is_file() else None
    return {
        "machine": device,
        "budget_seconds": float(budget) if budget and budget.isdigit() else None,
        "passed": sum(step.passed for step in steps),
        "steps": [{"number": step.number, "name": step.name, "outcome": step.outcome, "seconds": step.seconds,
                   "limit_seconds": step.limit, "command": step.command,
                   "rows": [row for table in step.tables for row in table["rows"]]} for step in steps],
        "not_run": not_run(steps),
    }


def render_report(work: Path, steps: list[Step]) -> str:
    data = report_data(work, steps)
    total = sum(step.seconds or 0.0 for step in steps)
    budget = f" of a {data['budget_seconds']:g}-s budget" if data["budget_seconds"] else ""
    lines = ["# fastdit GPU check", "", f"Machine: {data['machine'] or '(not recorded)'}", "",
             f"{data['passed']} of {len(steps)} steps passed, {total:.0f} s of step time{budget}.", "",
             "| # | step | outcome | seconds | limit | command |", "|---|---|---|---|---|---|"]
    for step in steps:
        seconds = "" if step.seconds is None else f"{step.seconds:.1f}"
        limit = "" if step.limit is None else f"{step.limit:g}"
        lines.append(f"| {step.number} | {step.name} | {step.outcome} | {seconds} | {limit} | `{step.command}` |")
    for step in steps:
        tables = [line for line in step.log if line.startswith("|")]
        notes = [line for line in step.log if not line.startswith("|") and _LATER_LINES.search(line)]
        if not (tables or notes or (step.log and not step.passed)):
            continue
        lines += ["", f"## {step.number}. {step.name}: {step.outcome}", ""]
        heading = [line for line in step.log[:3] if line and not line.startswith("|")]
        lines += heading[:1] + ([""] if heading else [])
        lines += tables
        if notes:
            lines += ([""] if tables else []) + [f"    {line}" for line in notes[-12:]]
        if step.log and not step.passed:
            lines += ["", "Last lines of its log:", "", "```", *step.log[-LOG_TAIL_LINES:], "```"]
    lines += ["", "## What did not run, and why", ""]
    lines += [f"- {item['step']}" + (f", row {item['row']}" if "row" in item else "") + f": {item['why']}"
              for item in data["not_run"]] or ["Everything ran."]
    return "\n".join(lines) + "\n"


def json_path(out: Path) -> Path:
    """The JSON beside the markdown report: report.md -> report.json."""
    return out.with_suffix(".json") if out.suffix == ".md" else out.with_name(out.name + ".json")


def write_report(work: Path, out: Path) -> list[Step]:
    steps = read_steps(work)
    atomic_write_text(render_report(work, steps), out)
    atomic_write_text(json.dumps(report_data(work, steps), indent=2) + "\n", json_path(out))
    return steps


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdit.bench.gpu_check", description=__doc__.split("\n\n")[0])
    jobs = parser.add_subparsers(dest="job", required=True)
    prepare_parser = jobs.add_parser("prepare", help="write WORK/vae and WORK/store")
    prepare_parser.add_argument("work")
    prepare_parser.add_argument("--items", type=int, default=STORE_ITEMS)
    report_parser = jobs.add_parser("report", help="write the report (markdown, and JSON beside it) from WORK/steps")
    report_parser.add_argument("work")
    report_parser.add_argument("out")
    doctor_parser = jobs.add_parser("doctor", help="exit 1 with one line when no CUDA device can be used")
    doctor_parser.add_argument("--driver", default=None, help="the NVIDIA driver's version (nvidia-smi's)")
    args = parser.parse_args(argv)
    try:
        if args.job == "doctor":
            problem = doctor(args.driver or None)
            print(problem or "a CUDA device is usable")
            return 1 if problem else 0
        if args.job == "prepare":
            if args.items < 1:
                raise UserError(f"--items must be at least 1, got {args.items}")
            print(f"wrote {prepare(Path(args.work), items=args.items)}")
        else:
            steps = write_report(Path(args.work), Path(args.out))
            print(f"wrote {args.out} and {json_path(Path(args.out))}: {sum(s.passed for s in steps)} of {len(steps)} "
                  "steps passed")
    except UserError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
