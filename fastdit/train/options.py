"""A training setting declared once: its default, its flag's help text and its range, as metadata of
a dataclass field. Every section of the training config (`fastdit.train.config`) and every training
extension's settings (`fastdit.train.extensions`) declare their fields with `option`; `fastdit train`'s
flags, the config's validation and the resume check read the metadata."""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing

from ..errors import UserError


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


def check_numbers(sections: dict) -> None:
    """Every number field of the config `sections` ({name: dataclass instance}): the right type, finite, and
    in the range its `option` metadata gives; a UserError naming the flag otherwise. A NaN fails every
    comparison (so `lr <= 0` lets it through): finiteness is checked first, on its own."""
    for section in sections.values():
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            value, kinds = getattr(section, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
            flag, hint = "--" + flag_name(f).replace("_", "-"), f.metadata.get("hint", "")
            if typing.get_origin(hints[f.name]) is tuple:
                continue  # checked by the field's own validation
            if (int not in kinds and float not in kinds) or (value is None and type(None) in kinds):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if int in kinds else numbers.Real):
                raise UserError(f"{flag} must be a {'whole ' if int in kinds else ''}number, got {value!r}")
            if not math.isfinite(value):
                raise UserError(f"{flag} must be a finite number, got {value}{hint}")
            if f.metadata.get("positive") and not value > 0:
                raise UserError(f"{flag} must be > 0, got {value}{hint}")
            if f.metadata.get("unit_interval") and not 0 <= value < 1:
                raise UserError(f"{flag} must be in [0, 1), got {value}")
            at_least = f.metadata.get("at_least")
            if at_least is not None and value < at_least:
                raise UserError(f"{flag} must be >= {at_least}, got {value}")
            at_most = f.metadata.get("at_most")
            if at_most is not None and value > at_most:
                raise UserError(f"{flag} must be <= {at_most}, got {value}")


def section_fields(sections: dict) -> dict[str, tuple[str, dataclasses.Field]]:
    """{flat flag name: (section, field)} over `sections` ({section name: its dataclass})."""
    return {flag_name(f): (section, f) for section, cls in sections.items() for f in dataclasses.fields(cls)}


class SectionedConfig:
    """The flat side of a run config made of sections (a dataclass each, one field of the config per
    section): built from flag names, read back as flag names or grouped by section. A config sets
    SECTIONS and KIND (the word its unknown-setting error uses)."""

    SECTIONS: typing.ClassVar[dict]
    KIND: typing.ClassVar[str]

    @classmethod
    def create(cls, **flat):
        """A config from flat {flag name: value} settings (`TrainConfig.create(model="DiT-B/2", lr=3e-4)`)."""
        fields = section_fields(cls.SECTIONS)
        unknown = sorted(set(flat) - set(fields))
        if unknown:
            raise UserError(f"unknown {cls.KIND} setting(s) {', '.join(unknown)}")
        parts: dict[str, dict] = {section: {} for section in cls.SECTIONS}
        for key, value in flat.items():
            section, f = fields[key]
            parts[section][f.name] = value
        return cls(**{section: cls.SECTIONS[section](**values) for section, values in parts.items()})

    def to_flat(self) -> dict:
        """{flag name: value} over every section."""
        return {flag_name(f): getattr(getattr(self, section), f.name)
                for section, cls in self.SECTIONS.items() for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict:
        return {section: {flag_name(f): getattr(getattr(self, section), f.name) for f in dataclasses.fields(cls)}
                for section, cls in self.SECTIONS.items()}
