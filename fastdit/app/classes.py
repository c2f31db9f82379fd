"""Class choices shown in the page: "207 golden retriever" for ImageNet models, "3" for the digits.

The label is the number in front, so names that repeat (ImageNet has two "crane"s) stay distinct.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from ..errors import UserError

IMAGENET_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k names in class-index order (the package's imagenet_classes.txt)."""
    text = files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line and not line.startswith("#"))


def class_choices(num_classes: int, class_names: list[str] | None = None) -> list[str]:
    """One choice per class: "index name" where names are known (recorded in the checkpoint, or
    ImageNet's for 1,000-class models), else the bare index."""
    if class_names is None and num_classes == IMAGENET_CLASSES:
        class_names = list(imagenet_class_names())
    if class_names is None or len(class_names) != num_classes:
        return [str(k) for k in range(num_classes)]
    return [str(k) if name == str(k) else f"{k} {name}" for k, name in enumerate(class_names)]


# The most classes a model may have here: past it a number is no class of any model, and a label that
# large would overflow the int64 tensor it is sampled with.
MAX_CLASS_INDEX = 10**7


def label_of(choice: str) -> int:
    """The class index of a choice ("207 golden retriever" -> 207); a UserError for anything that is not
    a choice of the page's (a head of other digits than 0-9, "²", or a number no model has)."""
    head = str(choice).split(" ", 1)[0]
    if not (head.isascii() and head.isdigit()) or len(head) > len(str(MAX_CLASS_INDEX)) or int(head) > MAX_CLASS_INDEX:
        raise UserError(f"class {str(choice)[:40]!r} is not one of the model's classes; pick one from the list")
    return int(head)
