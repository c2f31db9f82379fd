"""`fastdit app`: serve the sampling page on this machine (needs the `app` extra: `make app`)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile

from ..errors import UserError
from ..program import install_command

HELP = "a local web page to sample from the digits demo, a checkpoint or the official DiT/SiT weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..app.models import DEMO_FOLDERS
    from ..sampling.presets import preset_names

    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one, printed)")
    parser.add_argument("--demo-out", action="append", default=None, metavar="DIR",
                        help=f"folder of a `fastdit demo` run to offer as the digits model (default: {', '.join(DEMO_FOLDERS)})")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on CUDA GPUs, as `fastdit sample` (default: on; --no-tf32 for full float32)")
    # No argparse choices: an unknown name gets get_preset's one line, the same as in the library.
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="start on a named sampling preset (`fastdit presets`: " + ", ".join(preset_names()) +
                             "): its model, where it names one, and its sampler, steps, guidance and time shift "
                             "in the fields, as `fastdit sample --preset NAME` samples")
    from ..app.request import MAX_IMAGE_STEPS, MAX_IMAGES

    parser.add_argument("--max-images", type=int, default=MAX_IMAGES, metavar="N",
                        help=f"most images one request may make (default {MAX_IMAGES})")
    parser.add_argument("--max-image-steps", type=int, default=MAX_IMAGE_STEPS, metavar="N",
                        help=f"most images x sampling steps one request may cost (default {MAX_IMAGE_STEPS})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    from ..app.models import DEMO_FOLDERS
    from ..app.request import Limits
    from ..devices import resolve_device
    from ..precision import use_tf32
    from ..sampling.presets import get_preset

    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    for flag, value in (("--max-images", args.max_images), ("--max-image-steps", args.max_image_steps)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    use_tf32(resolve_device(args.device), args.tf32)  # a bad --device fails here, not in the page
    preset = get_preset(args.preset) if args.preset is not None else None
    # One folder per server for its PNGs and Gradio's copies of them, removed when it stops.
    work = tempfile.mkdtemp(prefix="fastdit-app-")
    # SIGTERM (a service manager stopping the app) ends like Ctrl+C: through the cleanup below.
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(work, "gradio")  # read when Gradio builds the page
    try:
        try:
            from ..app.page import PAGE_CSS, build_page
            from ..app.server import serve
        except ModuleNotFoundError as err:
            if err.name != "gradio":
                raise
            raise UserError(f"fastdit app needs Gradio; install it with: {install_command('app')}") from None
        port = args.port or free_port()
        page = build_page(args.demo_out or DEMO_FOLDERS, device=args.device, work_dir=work,
                          limits=Limits(args.max_images, args.max_image_steps), preset=preset)
        serve(page, port, css=PAGE_CSS)
        print(f"fastdit app: serving on http://127.0.0.1:{port} (Ctrl+C to stop)", flush=True)  # once it answers
        page.block_thread()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        shutil.rmtree(work, ignore_errors=True)
    return 0
