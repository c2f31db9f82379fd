"""Comparing a state dict with the one a model expects, in words a user can act on."""

from __future__ import annotations


def describe_mismatch(expected_state: dict, given_state: dict, limit: int = 6) -> str | None:
    """A readable list of missing, unexpected and mis-shaped keys, or None if they all match."""
    expected = {k: tuple(v.shape) for k, v in expected_state.items()}
    given = {k: tuple(v.shape) for k, v in given_state.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    if not (missing or unexpected or reshaped):
        return None

    def show(keys, fmt):
        text = ", ".join(fmt(k) for k in keys[:limit])
        return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing, str)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected, str)}")
    if reshaped:
        parts.append(f"shape mismatches: {show(reshaped, lambda k: f'{k} {given[k]} vs model {expected[k]}')}")
    return "; ".join(parts)
