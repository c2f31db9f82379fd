"""Images per second of `fastdit sample-ddp` for one model, per sampler (and batch size): a table.

Not a test: it times the real command path (per-image noise, guidance, decoding, chunk files) on
whatever device it is given, and says which device that was. Model loading, warm-up and the final
`.npz` assembly are not timed.

    python benchmarks/bench_sample.py --ckpt tiny.safetensors --device cpu --num-fid-samples 32
    torchrun --nproc_per_node 8 benchmarks/bench_sample.py --samplers ddpm ddim dpm++2m --num-sampling-steps 250 50 20

`--num-sampling-steps` gives one value for all samplers or one per sampler.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastdit import distributed as dist  # noqa: E402
from fastdit.cli.common import add_model_arguments, model_arguments  # noqa: E402
from fastdit.loading import load_for_sampling  # noqa: E402
from fastdit.errors import UserError  # noqa: E402
from fastdit.sample_ddp import SampleJob, sample_ddp  # noqa: E402
from fastdit.sampling import sampler_names  # noqa: E402
from fastdit.sampling import SamplingOptions, generate  # noqa: E402
from fastdit.sampling.indexed import labels_for  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--samplers", nargs="+", choices=sampler_names(), default=["ddpm"])
    parser.add_argument("--num-sampling-steps", type=int, nargs="+", default=[250])
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32], help="per process")
    parser.add_argument("--num-fid-samples", type=int, default=256, help="images per measurement, all processes together")
    parser.add_argument("--scratch", default=None, help="folder for the throw-away outputs (default: a temporary folder)")
    return parser.parse_args(argv)


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads per process)"


def main(argv=None) -> int:
    args = parse_args(argv)
    steps = args.num_sampling_steps
    if len(steps) not in (1, len(args.samplers)):
        raise UserError(f"give one --num-sampling-steps or one per sampler ({len(args.samplers)}), not {len(steps)}")
    steps = steps * len(args.samplers) if len(steps) == 1 else steps

    info = dist.init_from_env(args.device)
    args.device = str(info.device)
    # Once for every measurement; rank 0 first, so that official weights are downloaded only once.
    loaded = load_for_sampling(**model_arguments(args)) if info.is_main else None
    dist.barrier()
    loaded = loaded or load_for_sampling(**model_arguments(args))
    model, model_info, latent_space, device = loaded
    # Every process of one torchrun job must use the same folder: they share the run id.
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))
    scratch = Path(args.scratch or Path(tempfile.gettempdir()) / f"fastdit-bench-sample-{run_id}")

    rows = []
    for sampler, num_steps in zip(args.samplers, steps):
        options = SamplingOptions(sampler=sampler, num_steps=num_steps, cfg_scale=args.cfg_scale)
        for batch_size in args.batch_sizes:
            warm_up(model, latent_space, model_info, options, batch_size, device)
            job = SampleJob(
                out=scratch / f"{sampler}-{num_steps}-{batch_size}.npz",
                num_samples=args.num_fid_samples,
                options=options,
                batch_size=batch_size,
                chunk_size=max(1, args.num_fid_samples // (4 * info.world_size)),  # 4 chunks per process
                progress=False,
            )
            if info.is_main:  # a leftover of an interrupted benchmark would be resumed, not timed
                shutil.rmtree(scratch, ignore_errors=True)
            dist.barrier()
            report = sample_ddp(job, lambda: loaded, info)
            if report is not None:
                rows.append((sampler, num_steps, args.cfg_scale, batch_size, info.world_size, report.sampled,
                             report.seconds, report.images_per_second, report.images_per_second / info.world_size))
    dist.barrier()
    if info.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
        print_table(rows, model_info, device_name(info.device))
    dist.shutdown()
    return 0


def warm_up(model, latent_space, model_info, options: SamplingOptions, batch_size: int, device) -> None:
    """One untimed batch of two steps: kernel selection and the allocator settle before the clock starts."""
    indices = range(batch_size)
    labels = labels_for(indices, seed=0, num_classes=model_info.config.num_classes)
    short = SamplingOptions(sampler=options.sampler, num_steps=2, cfg_scale=options.cfg_scale)
    generate(model, latent_space, labels, options=short, objective=model_info.objective, indices=indices, device=device)


def print_table(rows, model_info, device: str) -> None:
    from fastdit.models import preset_of

    model = preset_of(model_info.config) or "custom DiT"
    size = f"{model_info.image_size}x{model_info.image_size}"
    print(f"\nsample-ddp throughput: {model}, {size}, {model_info.config.num_classes} classes, on {device}")
    header = ("sampler", "steps", "cfg", "batch/proc", "procs", "images", "seconds", "images/s", "images/s/proc")
    table = [header] + [
        (s, str(n), f"{c:g}", str(b), str(w), str(i), f"{t:.2f}", f"{r:.2f}", f"{p:.2f}") for s, n, c, b, w, i, t, r, p in rows
    ]
    widths = [max(len(row[k]) for row in table) for k in range(len(header))]
    for k, row in enumerate(table):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        sys.exit(f"bench_sample: error: {err}")
