"""Checking a state dict against the one a model expects (keys, shapes, dtypes, values), in words a user can act on."""

from __future__ import annotations

import torch

from .errors import UserError


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


def key_problems(expected_state: dict, given_state: dict) -> str | None:
    """The short form of `describe_mismatch` for a released file's one-line error: "missing a, b and 3
    more; unexpected c; misshapen d" (two keys of each kind), or None when keys and shapes all match."""
    missing = sorted(set(expected_state) - set(given_state))
    unexpected = sorted(set(given_state) - set(expected_state))
    misshapen = sorted(key for key in set(expected_state) & set(given_state)
                       if expected_state[key].shape != given_state[key].shape)
    problems = [f"{kind} {', '.join(keys[:2])}" + (f" and {len(keys) - 2} more" if len(keys) > 2 else "")
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    return "; ".join(problems) or None


def check_weight_values(state_dict: dict, source: str) -> None:
    """Refuse weights a model cannot use as they are, before they are copied into it.

    `load_state_dict` copies into the model's float parameters whatever the file holds: integer, bool
    or complex tensors would be cast silently (complex ones losing their imaginary part), so a file of
    another kind would load as a model of garbage. Non-finite weights (a training run that diverged,
    a damaged file) would make every sample NaN, written as a black image; one NaN anywhere is enough,
    since attention and normalisation spread it to every pixel."""
    for key, value in state_dict.items():
        if not value.is_floating_point():
            raise UserError(f"checkpoint {source!r} holds {str(value.dtype).replace('torch.', '')} values in {key!r}; "
                            f"model weights are floating point: this is not a model's state dict, or it was converted wrongly")
    for key, value in state_dict.items():
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(f"checkpoint {source!r} holds non-finite weights ({bad} NaN or inf value(s) in {key!r}): "
                            f"the training run that wrote it diverged or the file is damaged; use an earlier checkpoint")
