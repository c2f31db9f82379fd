"""`fastdit app`: serve the sampling page on this machine (needs the `app` extra: `make app`)."""

from __future__ import annotations

import argparse
import socket

from ..errors import UserError
from ..program import install_command

HELP = "a local web page to sample from the digits demo, a checkpoint or the official DiT/SiT weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..app.models import DEMO_FOLDERS

    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one, printed)")
    parser.add_argument("--demo-out", action="append", default=None, metavar="DIR",
                        help=f"folder of a `fastdit demo` run to offer as the digits model (default: {', '.join(DEMO_FOLDERS)})")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    from ..app.models import DEMO_FOLDERS
    from ..devices import resolve_device

    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    resolve_device(args.device)  # a bad --device fails here, not in the page
    try:
        from ..app.page import PAGE_CSS, build_page
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise UserError(f"fastdit app needs Gradio; install it with: {install_command('app')}") from None
    port = args.port or free_port()
    page = build_page(args.demo_out or DEMO_FOLDERS, device=args.device)
    page.queue().launch(server_name="127.0.0.1", server_port=port, quiet=True, footer_links=[], css=PAGE_CSS,
                       prevent_thread_lock=True)
    print(f"fastdit app: serving on http://127.0.0.1:{port} (Ctrl+C to stop)", flush=True)  # once it answers
    page.block_thread()
    return 0
