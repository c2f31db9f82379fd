"""The page's words for fastdit's messages. The library and the CLI word their errors for the command
line ("use --cfg-scale 1", "pass --ckpt PATH"); in the page the same advice must name its fields."""

from __future__ import annotations

import re

# Each flag `fastdit sample` shares with the page, and the page's field that sets it.
FIELD_OF_FLAG = {
    "--ckpt": "Checkpoint",
    "--model": "Model",
    "--class-labels": "Classes",
    "--sampler": "Sampler",
    "--num-sampling-steps": "Steps",
    "--cfg-scale": "Guidance scale",
    "--guidance-interval": "Guidance interval",
    "--official-guidance": "Official guidance",
    "--time-shift": "Time shift",
    "--seed": "Seed",
}
# Whole phrases whose word-for-word translation would read badly.
PHRASES = {
    "pass --ckpt PATH to a local copy": 'pick "local checkpoint" and give the path of a local copy in the Checkpoint field',
}
# A flag, and the value written after it when there is one (a number, or a placeholder such as PATH).
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?: (-?\d[\w.]*|[A-Z]+)\b)?")


def in_page_words(message: str) -> str:
    """`message` with every command-line flag replaced by the page's field ("use --cfg-scale 1" ->
    "use Guidance scale 1", a bare "--cfg-scale" -> "the Guidance scale field"); a flag the page has
    no field for loses its dashes."""
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
