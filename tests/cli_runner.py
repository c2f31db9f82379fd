"""`fastdit` run in this process as the command line would, for tests."""

from fastdit.cli import main


def run_cli(*args) -> int:
    """The exit status of `fastdit ARGS...` (argparse's errors exit 2 through SystemExit)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code
