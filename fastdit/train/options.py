"""A training setting declared once: its default, its flag's help text and its range, as metadata of
a dataclass field. Every section of the training config (`fastdit.train.config`) and every training
extension's settings (`fastdit.train.extensions`) declare their fields with `option`; `fastdit train`'s
flags, the config's validation and the resume check read the metadata."""

from __future__ import annotations

import dataclasses


def option(default, help: str, *, flag: str | None = None, at_least=None, at_most=None, positive: bool = False,
           unit_interval: bool = False, hint: str = "", flag_alone=None, resumable: bool = False, choices=None):
    """A config field with its flag's help text and its range, written once.

    `flag` names the flag (and the flat key) when it differs from the field name; `at_least`, `at_most`,
    `positive` (> 0) and `unit_interval` ([0, 1)) bound a number; `hint` ends its range message;
    `flag_alone` is the value of the flag given without one (`--route` alone routes at the paper's rate);
    `resumable`: the setting may change when a run is resumed (it changes how the run is watched or
    stored, not what it trains); `choices`: the values it takes (its flag lists and checks them)."""
    metadata = {"help": help, "flag": flag, "at_least": at_least, "at_most": at_most, "positive": positive,
                "unit_interval": unit_interval, "hint": hint, "flag_alone": flag_alone, "resumable": resumable,
                "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: dataclasses.Field) -> str:
    """The flat key (and `--flag`, with dashes) of a field."""
    return field.metadata.get("flag") or field.name
