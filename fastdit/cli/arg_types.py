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
    """A seed: an integer in [0, 2^64 - 1] (`fastdit.seeding.parse_seed`, which the app's Seed field uses too)."""
    from ..seeding import parse_seed

    try:
        return parse_seed(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
