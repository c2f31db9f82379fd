"""CLI flags generated from config dataclasses' typed fields: one source of truth for names, types,
defaults and help texts (each field's `help` metadata; `flag` metadata names a flag that differs from
the field's name, `flag_alone` gives the value of the flag written without one, `choices` the values
it takes)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from .arg_types import finite_float


def _base_type(annotation):
    """`int | None` -> int; `str` -> str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _tuple_items(annotation) -> tuple | None:
    """The item types of a fixed-length tuple annotation (`tuple[float, float]`), else None."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is tuple else None


def _with_default(help_text: str, default) -> str:
    """The help text and its default, said once: a text that says its default in its own words keeps
    them; otherwise "(default: X)", with None as "not set", a switch as on/off and a pair as its values."""
    if "default" in help_text:
        return help_text
    if default is None:
        shown = "not set"
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, tuple):
        shown = " ".join(map(str, default))
    else:
        shown = default
    return f"{help_text} (default: {shown})".strip()


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or field.name


def add_dataclass_arguments(parser, cls, skip=()) -> list[str]:
    """Add a flag for each field of `cls` (to a parser or an argument group); returns their dest names."""
    hints = typing.get_type_hints(cls)  # the annotations resolved (they are strings under `from __future__`)
    added = []
    for field in dataclasses.fields(cls):
        name = flag_of(field)
        if name in skip or field.default is dataclasses.MISSING:
            continue
        flag = "--" + name.replace("_", "-")
        kind, items = _base_type(hints[field.name]), _tuple_items(hints[field.name])
        text = _with_default(field.metadata.get("help", ""), field.default)
        alone = field.metadata.get("flag_alone")
        optional_value = {} if alone is None else {"nargs": "?", "const": alone}
        if items is not None:  # tuple[float, float] -> --flag A B
            if set(items) != {float}:
                raise TypeError(f"no flag type for {cls.__name__}.{field.name}: {field.type}")
            parser.add_argument(flag, dest=name, type=finite_float, nargs=len(items), default=field.default,
                                metavar="X", help=text)
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=field.default, help=text)
        elif kind in (int, float, str) and field.metadata.get("choices"):  # argparse lists and checks them
            parser.add_argument(flag, dest=name, type=kind, default=field.default, choices=field.metadata["choices"],
                                help=text, **optional_value)
        elif kind in (int, float, str):
            parser.add_argument(flag, dest=name, type=finite_float if kind is float else kind, default=field.default,
                                metavar=name.upper(), help=text, **optional_value)
        else:
            raise TypeError(f"no flag type for {cls.__name__}.{field.name}: {field.type}")
        added.append(name)
    return added
