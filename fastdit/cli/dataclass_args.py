"""CLI flags generated from a config dataclass's typed fields (one source of truth for names,
types and defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from .arg_types import finite_float


def _base_type(annotation):
    """`int | None` -> int; `str` -> str."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing})  # annotations are strings under `from __future__`
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, help_texts: dict[str, str], skip=()) -> None:
    for field in dataclasses.fields(cls):
        if field.name in skip or field.default is dataclasses.MISSING:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _base_type(field.type)
        text = help_texts.get(field.name, "")
        default_text = f"(default: {field.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=f"{text} {default_text}".strip())
        elif kind in (int, float, str):
            parser.add_argument(flag, type=finite_float if kind is float else kind, default=field.default, metavar=field.name.upper(),
                                help=f"{text} {default_text}".strip())


def dataclass_from_args(cls, args: argparse.Namespace, skip=()):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip and hasattr(args, f.name)}
    return cls(**values)
