"""The page's words for fastdit's messages.

A sampling option's error (`OptionError`) speaks of its value and says which option it is about; the
page names that option by its field (`field_name`: "the Guidance scale field", "Guidance scale 1"),
from the same schema its fields come from. A few other messages (the checkpoint's, the hub's) give
their advice in command-line flags ("pass --ckpt PATH"); `in_page_words` puts those in the page's words.
"""

from __future__ import annotations

import re

from ..sampling import OPTIONS

# The page's field for each flag `fastdit sample` shares with it: every sampling option's, and the rest.
FIELD_OF_FLAG = {
    "--ckpt": "Checkpoint",
    "--model": "Model",
    "--class-labels": "Classes",
    **{flag: option.label for option in OPTIONS.values() for flag in (option.flag, option.off) if flag},
    "--seed": "Seed",
}
# Whole phrases whose word-for-word translation would read badly.
PHRASES = {
    "pass --ckpt PATH to a local copy": 'pick "local checkpoint" and give the path of a local copy in the Checkpoint field',
}
# A flag, and the value written after it when there is one (a number, or a placeholder such as PATH).
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?: (-?\d[\w.]*|[A-Z]+)\b)?")


def field_name(field: str, value: str | None = None) -> str:
    """How the page names a sampling option in a message (`OptionError.at_edge`): "the Steps field",
    or set to a value, "Guidance scale 1"; the loading functions' `source` is the Checkpoint field."""
    option = OPTIONS.get(field)
    label = option.label if option is not None else {"source": "Checkpoint"}.get(field, field.replace("_", " "))
    return f"the {label} field" if value is None else f"{label} {value}"


def in_page_words(message: str) -> str:
    """A message worded for the command line, in the page's words: every flag replaced by the page's
    field ("use --cfg-scale 1" -> "use Guidance scale 1", a bare "--cfg-scale" -> "the Guidance scale
    field"); a flag the page has no field for loses its dashes. Only for messages that are no
    `OptionError`: those carry their options and are named by `field_name`."""
    for phrase, words in PHRASES.items():
        message = message.replace(phrase, words)

    def field(match: re.Match) -> str:
        flag, value = f"--{match.group(1)}", match.group(2)
        name = FIELD_OF_FLAG.get(flag)
        if name is None:
            name = match.group(1).replace("-", " ")
            return f"{name} {value}" if value else name
        return f"{name} {value}" if value else f"the {name} field"

    return _FLAG.sub(field, message)
