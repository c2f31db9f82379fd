"""The demo's pictures: the sample grid (one row per class) and the training loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..image_grid import make_grid
from ..io import atomic_path, atomic_save_png


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


def read_loss_curve(metrics_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) from a run's metrics.jsonl; a step logged twice (a resumed run) keeps its last value."""
    by_step = {}
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "loss" in record:
                by_step[int(record["step"])] = float(record["loss"])
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def save_loss_plot(steps: np.ndarray, losses: np.ndarray, path: Path, title: str = "training loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must come before pyplot is imported
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    axes.plot(steps, losses, linewidth=1.0)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (mean over the logging window)")
    axes.set_title(title)
    # The loss falls by orders of magnitude early on; a log scale keeps the later part readable.
    if len(losses) and np.all(losses > 0):
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
