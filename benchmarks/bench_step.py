"""One training step and one guided sampling step, against a reference row that computes what the
official DiT code computes, each row in a fresh process, ratios to the reference in the same run.

    python benchmarks/bench_step.py                                   # CPU: DiT-S/2, batch 8, latent 32
    python benchmarks/bench_step.py --model DiT-B/2 --steps 3
    python benchmarks/bench_step.py --device cuda --model DiT-XL/2 --batch 32

The reference rows are the official step as the released code runs it with today's timm: fp32, eager,
attention through `scaled_dot_product_attention` (timm's fused path, which the official blocks use), no
checkpointing, the IDDPM loss (`training_losses`, MSE + VLB), `torch.optim.AdamW` with its defaults, and
the official per-parameter EMA loop (`ema.mul_(d).add_(p, alpha=1 - d)`); for sampling, the official
`forward_with_cfg` on the doubled batch and one `p_sample`. fastdit's rows use the public API and the
training setup's switches. Peak memory is CUDA's max allocated, or the process's peak resident set on
a CPU (which includes the interpreter and libraries: compare rows, not absolute values).

Speed claims need an otherwise idle machine: on 2 cores, any other job skews the rows unequally.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TRAIN_ROWS = ("reference", "fastdit", "fastdit+ckpt", "fastdit+bf16", "fastdit+ckpt+bf16")
SAMPLE_ROWS = ("reference", "fastdit", "fastdit+bf16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256px images)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--train-rows", nargs="*", choices=TRAIN_ROWS, default=list(TRAIN_ROWS))
    parser.add_argument("--sample-rows", nargs="*", choices=SAMPLE_ROWS, default=list(SAMPLE_ROWS))
    return parser.parse_args(argv)


def official_ema_update(ema, model, decay: float) -> None:
    # The released train.py's update_ema: one mul_ and one add_ per parameter.
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def _train_row(queue, args, row: str) -> None:
    from fastdit.diffusion import create_diffusion
    from fastdit.models import build_model
    from fastdit.train.ema import make_ema, update_ema
    from fastdit.train.logger import peak_memory_gb
    from fastdit.precision import autocast
    from fastdit.train.setup import checkpoint_blocks

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, input_size=args.latent, num_classes=1000).to(device).train()
    ema = make_ema(model)
    diffusion = create_diffusion("")
    reference = row == "reference"
    if "ckpt" in row:
        checkpoint_blocks(model)
    precision = "bf16" if "bf16" in row else "fp32"
    # The released code builds AdamW with its defaults; fastdit's training uses the fused kernel.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=None if reference else True)
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (args.batch,), device=device)
        with autocast(device, precision):
            if reference:
                loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
            else:
                loss = diffusion.loss(model, x, {"y": y}, t=t).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        (official_ema_update if reference else update_ema)(ema, model, 0.9999)

    queue.put(_time(step, args, device, peak_memory_gb))


def _sample_row(queue, args, row: str) -> None:
    from fastdit.diffusion import create_diffusion
    from fastdit.models import build_model
    from fastdit.sampling import ClassifierFreeGuidance
    from fastdit.train.logger import peak_memory_gb
    from fastdit.precision import autocast

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, input_size=args.latent, num_classes=1000).to(device).eval()
    diffusion = create_diffusion("250")
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    t = torch.full((args.batch,), 200, device=device, dtype=torch.long)
    precision = "bf16" if "bf16" in row else "fp32"
    if row == "reference":  # sample.py: the doubled batch through forward_with_cfg
        x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
        y_in = torch.cat([y, torch.full_like(y, 1000)])
        def model_fn(x_, t_, y):
            return model.forward_with_cfg(x_, t_, y, 4.0)

        args_in = (x_in, t_in, y_in)
    else:
        model_fn = ClassifierFreeGuidance(model, 4.0, model.config.null_class, 4, 3)
        args_in = (x, t, y)

    @torch.no_grad()
    def step():
        with autocast(device, precision):
            diffusion.p_sample(model_fn, args_in[0], args_in[1], model_kwargs={"y": args_in[2]})

    queue.put(_time(step, args, device, peak_memory_gb))


def _time(step, args, device, peak_memory_gb) -> tuple[float, float]:
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return args.steps / (time.perf_counter() - start), peak_memory_gb(device)


def run_isolated(target, args, row):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(queue, args, row))
    process.start()
    while True:  # a row that crashes must not leave the table waiting forever
        try:
            result = queue.get(timeout=1.0)
            break
        except Exception:  # noqa: BLE001 - queue.Empty
            if not process.is_alive():
                raise SystemExit(f"row {row!r} failed (exit code {process.exitcode}); see its traceback above")
    process.join()
    return result


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.get_num_threads()} threads, ATen {torch.backends.cpu.get_cpu_capability()})"


def print_table(title: str, results: dict[str, tuple[float, float]], batch: int) -> None:
    reference = results.get("reference")
    print(f"\n{title}")
    print("| row | steps/s | images/s | peak GB | speed vs reference | memory vs reference |")
    print("|---|---|---|---|---|---|")
    for row, (rate, memory) in results.items():
        ratios = ("", "") if reference is None else (f"{rate / reference[0]:.2f}x", f"{memory / reference[1]:.2f}x")
        print(f"| {row} | {rate:.3f} | {rate * batch:.2f} | {memory:.2f} | {ratios[0]} | {ratios[1]} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"{args.model}, batch {args.batch}, latent {args.latent}, on {device_name(args.device)}, torch {torch.__version__}")
    train = {row: run_isolated(_train_row, args, row) for row in args.train_rows}
    print_table("training step (forward, MSE + VLB, backward, AdamW, EMA)", train, args.batch)
    sample = {row: run_isolated(_sample_row, args, row) for row in args.sample_rows}
    print_table("guided sampling step (cfg 4, official 3-channel guidance, one p_sample)", sample, args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
