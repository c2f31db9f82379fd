"""What a sweep shows: the table (every point, best first) and the plot (the metric against each setting)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..sampling.options import OPTIONS
from .space import Point, show

COLUMN_NAMES = {"ema": "EMA", **{name: OPTIONS[name].flag.removeprefix("--") for name in OPTIONS}}


@dataclass
class Row:
    point: Point
    cheap: dict  # scores at the sweep's sample count
    full: dict | None = None  # scores at the confirmation's count, for the confirmed points

    def value(self, setting: str):
        return self.point.weights.label if setting == "ema" else self.point.recipe_values[setting]

    def shown(self, setting: str) -> str:
        return self.value(setting) if setting == "ema" else show(setting, self.value(setting))


def ranked(rows: list[Row], metric: str) -> list[Row]:
    """Best (lowest) first, then by name: the same order whatever order the points were scored in."""
    return sorted(rows, key=lambda row: (row.cheap[metric], row.point.name))


def table_lines(rows: list[Row], swept: list[str], scorer, counts: tuple[int, int | None], winner: Row | None) -> list[str]:
    """A markdown table: the swept settings, the metric and what is shown beside it at the sweep's count,
    then at the confirmation's count for the confirmed points; the winner marked."""
    cheap_count, full_count = counts
    settings = swept or ["ema"]
    beside = [(key, f"{name} ({cheap_count})", form) for key, name, form in scorer.others]
    header = [COLUMN_NAMES[s] for s in settings] + [f"{scorer.label} ({cheap_count})"] + [name for _, name, _ in beside]
    if full_count:
        header += [f"{scorer.label} ({full_count})"] + [f"{name} ({full_count})" for _, name, _ in scorer.others]
    header.append("")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in ranked(rows, scorer.metric):
        cells = [row.shown(s) for s in settings] + [f"{row.cheap[scorer.metric]:.4g}"]
        cells += [form.format(row.cheap[key]) for key, _, form in beside]
        if full_count:
            if row.full:
                cells += [f"{row.full[scorer.metric]:.4g}"] + [form.format(row.full[key]) for key, _, form in scorer.others]
            else:
                cells += [""] * (1 + len(scorer.others))
        cells.append("**best**" if winner is not None and row.point == winner.point else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def save_plot(rows: list[Row], swept: list[str], scorer, cheap_count: int, winner: Row | None, path: Path) -> Path:
    """One panel per swept setting: every point's metric (grey), the best over the other settings at
    each value (the line), the winner (ringed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    settings = swept or ["ema"]
    figure, panels = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False)
    for panel, setting in zip(panels[0], settings):
        values = []  # the setting's values in the order of the command
        for row in rows:
            if row.value(setting) not in values:
                values.append(row.value(setting))
        numeric = setting in ("cfg_scale", "num_steps", "time_shift")
        position = {value: (value if numeric else index) for index, value in enumerate(values)}
        xs = [position[row.value(setting)] for row in rows]
        ys = [row.cheap[scorer.metric] for row in rows]
        panel.scatter(xs, ys, color="0.6", s=18, zorder=2, label="every point")
        best = [min(row.cheap[scorer.metric] for row in rows if row.value(setting) == value) for value in values]
        order = sorted(range(len(values)), key=lambda i: position[values[i]])
        panel.plot([position[values[i]] for i in order], [best[i] for i in order], "o-", color="tab:blue", zorder=3,
                   label="best over the others")
        if winner is not None:
            panel.scatter([position[winner.value(setting)]], [winner.cheap[scorer.metric]], s=140, facecolors="none",
                          edgecolors="tab:red", linewidths=2, zorder=4, label="winner")
        if not numeric:
            panel.set_xticks(range(len(values)))
            panel.set_xticklabels([value if setting == "ema" else show(setting, value) for value in values],
                                  rotation=20 if setting == "ema" else 0)
        panel.set_xlabel(COLUMN_NAMES[setting])
        panel.set_ylabel(f"{scorer.label}, {cheap_count} samples")
        panel.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return path
