"""The Python half of `benchmarks/gpu_check.sh` (`make gpu-check`): the stand-ins its steps need, and
the one report file it writes.

    python -m fastdit.bench.gpu_check prepare WORK     # WORK/vae and WORK/store (random, no download)
    python -m fastdit.bench.gpu_check report WORK OUT  # OUT (markdown) from WORK/steps

`prepare` writes an AutoencoderKL of the SD VAE's shape with random weights (a diffusers folder, what
`--vae FOLDER` loads) and a latent store of random VAE moments at 256 px that names that folder: the
check trains and samples DiT-XL/2 with the real code paths and real shapes, and downloads nothing.

The shell script runs each step under a time limit and leaves, per step, `WORK/steps/NN-name.cmd` (the
command), `NN-name.log` (its output) and `NN-name.status` ("EXIT SECONDS", or "skipped REASON");
`report` reads them and writes one markdown file: the machine, a table of the steps, the bench tables
the steps printed, and the tail of the log of every step that did not pass. A step that never ran (a
dry run, a stopped script) is listed as not run.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
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
    outcome: str  # passed | failed (exit N) | timed out | skipped (...) | not run
    seconds: float | None
    log: list[str]

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


def read_step(steps_dir: Path, cmd_file: Path) -> Step:
    match = _STEP_FILE.fullmatch(cmd_file.name)
    stem = cmd_file.name[: -len(".cmd")]
    log_file, status_file = steps_dir / f"{stem}.log", steps_dir / f"{stem}.status"
    log = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
    outcome, seconds = "not run", None
    if status_file.is_file():
        words = status_file.read_text().split()
        if words and words[0] == "skipped":
            outcome = "skipped (" + " ".join(words[1:]) + ")"
        elif len(words) == 2 and words[0].lstrip("-").isdigit():
            code, seconds = int(words[0]), float(words[1])
            outcome = ("passed" if code == 0 else "timed out (its limit reached)" if code in TIMED_OUT
                       else f"failed (exit {code})")
        else:
            outcome = f"unreadable status {' '.join(words)!r}"
    return Step(int(match[1]) if match else 0, match[2] if match else stem, cmd_file.read_text().strip(),
                outcome, seconds, log)


def read_steps(work: Path) -> list[Step]:
    steps_dir = work / "steps"
    if not steps_dir.is_dir():
        raise UserError(f"{str(steps_dir)!r} does not exist: run benchmarks/gpu_check.sh (it writes the steps), "
                        f"or give the work folder it used")
    return sorted((read_step(steps_dir, path) for path in steps_dir.glob("*.cmd")), key=lambda s: s.number)


def render_report(work: Path, steps: list[Step]) -> str:
    device = (work / "device.txt").read_text().strip() if (work / "device.txt").is_file() else "(not recorded)"
    passed = sum(step.passed for step in steps)
    total = sum(step.seconds or 0.0 for step in steps)
    lines = ["# fastdit GPU check", "", f"Machine: {device}", "",
             f"{passed} of {len(steps)} steps passed, {total:.0f} s of step time.", "",
             "| # | step | outcome | seconds | command |", "|---|---|---|---|---|"]
    for step in steps:
        seconds = "" if step.seconds is None else f"{step.seconds:.1f}"
        lines.append(f"| {step.number} | {step.name} | {step.outcome} | {seconds} | `{step.command}` |")
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
    return "\n".join(lines) + "\n"


def write_report(work: Path, out: Path) -> list[Step]:
    steps = read_steps(work)
    atomic_write_text(render_report(work, steps), out)
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
    report_parser = jobs.add_parser("report", help="write the report from WORK/steps")
    report_parser.add_argument("work")
    report_parser.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.job == "prepare":
            if args.items < 1:
                raise UserError(f"--items must be at least 1, got {args.items}")
            print(f"wrote {prepare(Path(args.work), items=args.items)}")
        else:
            steps = write_report(Path(args.work), Path(args.out))
            print(f"wrote {args.out}: {sum(s.passed for s in steps)} of {len(steps)} steps passed")
    except UserError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
