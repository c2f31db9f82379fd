"""The demo's pictures: the sample grid (one row per class) and the training loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..image_grid import make_grid
from ..io import atomic_path, atomic_save_png
from ..train.logger import loss_terms

LOG_SCALE_RANGE = 3.0  # a panel goes to a log scale when its values span more than this factor


def save_class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, columns: int, path: Path, scale: int = 4) -> Path:
    """One row per class holding its first `columns` samples, enlarged `scale`x (8x8 digits are tiny)."""
    rows = []
    for k in range(num_classes):
        members = images[labels == k][:columns]
        blank = np.zeros((columns - len(members), *images.shape[1:]), dtype=np.uint8)  # a class with fewer samples
        rows.append(np.concatenate([members, blank]))
    grid = make_grid(np.concatenate(rows), nrow=columns)
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    atomic_save_png(grid, path)
    return path


OBJECTIVE_TERM = "objective"  # the objective's own loss, when extensions add weighted terms to "loss"
LOGGED_OBJECTIVE = "objective_loss"  # how `fastdit.train.step` logs it (OBJECTIVE_LOSS there)


def read_loss_terms(metrics_path: Path, weights: dict[str, float] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps, {term name: values}) from a run's metrics.jsonl: every loss term logged by name ("loss",
    the one optimised, first). A step logged twice (a resumed run) keeps its last values.

    The objective's own loss, which training logs as "objective_loss" when a method adds terms to "loss",
    comes back as "objective" after "loss". For runs logged before that, `weights` (the methods' terms and
    their weights in "loss", REPA's {"repa": λ}) derive it: loss − Σ λ·term, exact for the window means
    logged (a mean is linear)."""
    by_step: dict[int, dict[str, float]] = {}
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            terms = loss_terms(record)
            if terms:
                by_step[int(record["step"])] = terms
    steps = np.array(sorted(by_step), dtype=np.int64)
    names = sorted({name for terms in by_step.values() for name in terms}, key=lambda name: (name != "loss", name))
    terms = {name: np.array([by_step[s].get(name, np.nan) for s in steps], dtype=np.float64) for name in names}
    if LOGGED_OBJECTIVE in terms:  # the step logs the objective's own loss when methods add terms to it
        objective = terms.pop(LOGGED_OBJECTIVE)
        return steps, {"loss": terms["loss"], OBJECTIVE_TERM: objective, **{k: v for k, v in terms.items() if k != "loss"}}
    weighted = {name: weight for name, weight in (weights or {}).items() if name in terms and weight}
    if weighted and "loss" in terms:  # runs from before it was logged: derived
        objective = terms["loss"] - sum(weight * terms[name] for name, weight in weighted.items())
        terms = {"loss": terms["loss"], OBJECTIVE_TERM: objective, **{k: v for k, v in terms.items() if k != "loss"}}
    return steps, terms


def loss_figure(steps: np.ndarray, terms: dict[str, np.ndarray], title: str = "training loss"):
    """One panel per loss term, titled by its name, over a shared step axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must come before pyplot is imported
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(len(terms), 1, figsize=(6, 1.2 + 1.8 * len(terms)), dpi=100, sharex=True,
                                  squeeze=False)
    for axes, (name, values) in zip(panels[:, 0], terms.items()):
        label = name if name != "loss" or len(terms) == 1 else "loss (the sum that is optimised)"
        if name == OBJECTIVE_TERM:
            label = "the objective's own loss (the sum less the weighted terms below)"
        axes.plot(steps, values, linewidth=1.0, label=label)
        axes.set_title(label, fontsize=10)
        axes.set_ylabel("mean over the\nlogging window", fontsize=8)
        # A term that falls by orders of magnitude reads best on a log scale; one that moves by less than
        # a factor of 3 (MeanFlow's adaptively weighted loss stays near 1) reads best on a linear one, and
        # REPA's (a negative cosine) and a sum that holds it can be negative, so keep a linear one too.
        finite = values[np.isfinite(values)]
        if len(finite) and np.all(finite > 0) and finite.max() > LOG_SCALE_RANGE * finite.min():
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
    panels[-1, 0].set_xlabel("step")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def save_loss_plot(steps: np.ndarray, terms: dict[str, np.ndarray], path: Path, title: str = "training loss") -> Path:
    import matplotlib.pyplot as plt

    figure = loss_figure(steps, terms, title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
