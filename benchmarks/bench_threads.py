"""How fastdit's CPU jobs fare on a busy machine: thread counts and OpenMP's wait policy, alone and
beside competing processes, in one run.

    python benchmarks/bench_threads.py                      # the digits demo's training, 0/1/3 competitors
    python benchmarks/bench_threads.py --competitors 0 1 --steps 40

Each row runs `fastdit train` on the digits (the demo's DiT-T/2, batch 128) for a number of steps in a
fresh process, with one setting of the threads (`--threads`) and of OpenMP's wait policy
(`OMP_WAIT_POLICY`), while K other processes keep K cores busy (each a Python loop that never sleeps,
as another job would). Steps/s is counted after the first 5 steps (start-up and warm-up excluded).

OpenMP threads spin at barriers while waiting for a sibling thread: when another process holds the
sibling's core, the spinning thread burns its own time slice for nothing, and every parallel region
waits for the descheduled thread. The rows show what each choice costs alone and recovers under load.
Run it on an otherwise idle machine: the competitors are the only load it is meant to see.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastdit import devices  # noqa: E402

# name -> (extra `fastdit train` flags, environment). "default" is what fastdit does when nothing is set.
SETTINGS = {
    "default": ([], {}),
    "2 threads (torch's own count; fastdit before)": (["--threads", "2"], {}),
    "2 threads, active": (["--threads", "2"], {"OMP_WAIT_POLICY": "ACTIVE"}),
    "2 threads, passive": (["--threads", "2"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread, active": (["--threads", "1"], {"OMP_WAIT_POLICY": "ACTIVE"}),
    "1 thread, passive": (["--threads", "1"], {"OMP_WAIT_POLICY": "PASSIVE"}),
}
SPIN = "while True: pass"
WARMUP_STEPS = 5


def train_steps_per_second(work: Path, flags: list[str], env: dict, steps: int) -> float:
    run = work / f"run-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "fastdit", "train", "--data-path", "digits", "--model", "DiT-T/2",
               "--image-size", "8", "--num-classes", "10", "--vae", "pixels", "--global-batch-size", "128",
               "--max-steps", str(steps), "--ckpt-every", str(steps), "--log-every", "1", "--num-workers", "0",
               "--no-progress", "--no-tensorboard", "--results-dir", str(run), "--run-name", "run", *flags]
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    subprocess.run(command, env={**clean, **env, "PYTHONPATH": str(REPO)}, check=True, capture_output=True)
    metrics = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    # One log line a step, each with that step's rate: the run's rate is steps over the summed step times.
    rates = [m["steps_per_sec"] for m in metrics if m["step"] > WARMUP_STEPS]
    return len(rates) / sum(1 / rate for rate in rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--competitors", nargs="+", type=int, default=[0, 1, 3])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fastdit-threads-"))
    results: dict[tuple[str, int], float] = {}
    for count in args.competitors:
        competitors = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
        try:
            time.sleep(1.0 if count else 0.0)  # let the load settle (and the load average see it)
            for name in args.settings:
                flags, env = SETTINGS[name]
                results[name, count] = train_steps_per_second(work, flags, env, args.steps)
                print(f"  {count} competing, {name}: {results[name, count]:.2f} steps/s", flush=True)
        finally:
            for process in competitors:
                process.kill()
                process.wait()

    print(f"\nfastdit train on the digits (DiT-T/2, batch 128), steps/s after {WARMUP_STEPS} warm-up steps; "
          f"{devices.cpu_name()}, {os.cpu_count()} cores")
    print("| setting | " + " | ".join(f"{c} competing" for c in args.competitors) + " |")
    print("|---|" + "---|" * len(args.competitors))
    for name in args.settings:
        cells = []
        for count in args.competitors:
            ratio = f" ({results[name, count] / results['default', 0]:.2f}x)" if ("default", 0) in results else ""
            cells.append(f"{results[name, count]:.2f}{ratio}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n(x): against the default setting alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
