"""Errors that a user can fix. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

import string
from typing import Callable

# How an edge names an option: name(field, None) names the option ("--cfg-scale", "the Guidance scale
# field"), name(field, value) the option set to a value ("--cfg-scale 1", "Guidance scale 1").
OptionNamer = Callable[[str, "str | None"], str]


class UserError(ValueError):
    """A bad argument, file or setting, with a message that names the value and the fix."""


class DownloadError(UserError):
    """A file could not be downloaded (offline, HTTP error, interrupted transfer)."""


def flag_namer(flags: dict[str, str] | None = None) -> OptionNamer:
    """The command line's names for options: `flags` (field -> flag) where given, else `--` and the
    field's name with dashes (cfg_scale -> --cfg-scale)."""

    def name(field: str, value: str | None = None) -> str:
        flag = (flags or {}).get(field) or "--" + field.replace("_", "-")
        return flag if value is None else f"{flag} {value}"

    return name


class OptionError(UserError):
    """A refused value of one or more options (`fields`, e.g. "cfg_scale"), worded for every edge.

    The message speaks of the value ("cfg scale 0.5 < 1 would push samples away from their class").
    Where it must name an option, its template says "{cfg_scale}" (the option) or "{cfg_scale:1}" (the
    option set to 1); the other placeholders are the keyword `values`. The edge that took the value
    names the options in its own words (`at_edge`): the command line by its flags, the app by its
    fields. str() is the message with the options named as flags (`flag_namer`), without that tag.
    """

    def __init__(self, template: str, *fields: str, **values):
        if not fields or set(fields) & set(values):
            raise ValueError(f"an OptionError names its options, apart from its values: {fields}, {sorted(values)}")
        self.template, self.fields, self.values = template, fields, values
        super().__init__(self.in_words(flag_namer()))

    def in_words(self, name: OptionNamer) -> str:
        """The message, with the options its template names in `name`'s words."""
        return self.template.format(**self.values, **{field: _Option(field, name) for field in self.fields})

    @property
    def unnamed(self) -> tuple[str, ...]:
        """The fields the message does not name itself."""
        named = {placeholder for _, placeholder, _, _ in string.Formatter().parse(self.template) if placeholder}
        return tuple(field for field in self.fields if field not in named)

    def at_edge(self, name: OptionNamer) -> str:
        """The message as an edge shows it: the options in its words, and after it the ones the message
        does not name ("... got 0 (--num-sampling-steps)", "... got 0 (the Steps field)")."""
        unnamed = ", ".join(name(field, None) for field in self.unnamed)
        return self.in_words(name) + (f" ({unnamed})" if unnamed else "")

    def within(self, context: str) -> "OptionError":
        """The same error, its message after `context` ("preset X (for flow models): ...")."""
        escaped = context.replace("{", "{{").replace("}", "}}")
        return OptionError(escaped + self.template, *self.fields, **self.values)


def python_namer(field: str, value: str | None = None) -> str:
    """How Python code names an argument: its keyword, set to a value as Python writes it (`vae=PATH` for a
    placeholder, `vae='pixels'` for a name)."""
    if value is None:
        return field
    literal = value.isupper() or value.replace(".", "", 1).lstrip("-").isdigit()
    return f"{field}={value if literal else repr(value)}"


class ArgumentError(OptionError):
    """An error whose advice names arguments of the loading functions (`source`, the checkpoint's path;
    `vae`) rather than sampling options: str() names them as Python does (`source=PATH`), since the
    library's caller is Python; each edge names them in its own words (`at_edge`: `--ckpt PATH`, the
    Checkpoint field)."""

    def __init__(self, template: str, *fields: str, **values):
        super().__init__(template, *fields, **values)
        self.args = (self.in_words(python_namer),)


class FetchError(DownloadError, ArgumentError):
    """A file that is neither here nor downloadable now, with what to do about it (`ArgumentError`)."""


def template_text(text: str) -> str:
    """`text` as literal text inside an `OptionError` template (its braces escaped)."""
    return text.replace("{", "{{").replace("}", "}}")


class _Option:
    """A field in a template: "{cfg_scale}" is `name(field, None)`, "{cfg_scale:1}" `name(field, "1")`."""

    def __init__(self, field: str, name: OptionNamer):
        self.field, self.name = field, name

    def __format__(self, value: str) -> str:
        return self.name(self.field, value or None)
