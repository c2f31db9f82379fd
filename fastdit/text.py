"""Words in the lines fastdit prints."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """"1 step", "2 steps": a count with its noun in the right number (`plural` where adding "s" is wrong)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
