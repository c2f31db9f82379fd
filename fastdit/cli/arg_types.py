"""argparse `type=` functions for values a plain `float`/`int` lets through.

argparse turns an `ArgumentTypeError` into one line that names the flag
(`fastdit sample: error: argument --cfg-scale: 'nan' is not a finite number ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A float that is not nan or ±inf: `float()` accepts "nan" and "inf", which no setting of ours means."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; nan and inf mean nothing here, give a real number")
    return value


def seed(text: str) -> int:
    """A seed: an integer in [0, 2^64 - 1] (`fastdit.seeding` hashes non-negative integers only, and
    torch.manual_seed takes 64 bits)."""
    from ..seeding import MAX_SEED

    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; seeds are integers >= 0, e.g. 0")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is too large; seeds are integers from 0 to 2^64 - 1 ({MAX_SEED})")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a count of threads, images, ...)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
