"""The demo's loss plot: one panel per loss term, named as the objective logged it in metrics.jsonl."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from fastdit.demo.plots import loss_figure, read_loss_terms, save_loss_plot


def write_metrics(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def statistics(step):
    return {"steps_per_sec": 5.0, "images_per_sec": 640.0, "peak_memory_gb": 0.8, "lr": 1e-3, "epoch": step // 12}


def test_the_terms_come_from_the_log_by_name(tmp_path):
    records = [
        {"step": 1, "loss": 2.0, "mse": 1.5, "vb": 0.5, **statistics(1)},
        {"step": 2, "loss": 1.0, "mse": 0.75, "vb": 0.25, **statistics(2)},
        {"step": 2, "loss": 0.5, "mse": 0.375, "vb": 0.125, **statistics(2)},  # a resumed run logged step 2 again
        {"step": 2, "eval/fid": 31.0},  # an evaluation record holds no loss term
        {"step": 3, "loss": 0.25, "mse": 0.2, "vb": 0.05, **statistics(3)},
    ]
    steps, terms = read_loss_terms(write_metrics(tmp_path / "metrics.jsonl", records))
    np.testing.assert_array_equal(steps, [1, 2, 3])
    assert list(terms) == ["loss", "mse", "vb"]  # the optimised sum first, then the terms by name
    np.testing.assert_array_equal(terms["loss"], [2.0, 0.5, 0.25])  # the last value of a repeated step
    np.testing.assert_array_equal(terms["vb"], [0.5, 0.125, 0.05])


@pytest.mark.parametrize("terms, titles", [
    ({"loss": [1.0, 0.2]}, ["loss"]),
    ({"loss": [1.0, 0.999], "mse": [8.0, 0.4], "vb": [0.2, 0.01]}, ["loss (the sum that is optimised)", "mse", "vb"]),
    ({"loss": [0.2, -0.3], "repa": [-0.5, -0.9]}, ["loss (the sum that is optimised)", "repa"]),
])
def test_each_term_has_a_panel_titled_by_its_name(terms, titles):
    figure = loss_figure(np.array([1, 2]), {name: np.array(values) for name, values in terms.items()}, "DiT-T/2")
    try:
        assert [axes.get_title() for axes in figure.axes] == titles
        # log scale only where every value is positive (a negative cosine, REPA's, cannot be drawn on
        # one) and the values span more than a factor of 3 (MeanFlow's weighted loss stays near 1)
        assert [axes.get_yscale() for axes in figure.axes] == [
            "log" if min(values) > 0 and max(values) > 3 * min(values) else "linear" for values in terms.values()]
    finally:
        plt.close(figure)


def test_the_plot_is_written_as_a_png(tmp_path):
    path = save_loss_plot(np.array([1, 2]), {"loss": np.array([1.0, 0.5]), "repa": np.array([-0.1, -0.4])},
                          tmp_path / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp*"))


def test_the_objectives_own_loss_has_its_panel_beside_the_sum_and_the_repa_term(tmp_path):
    """With REPA, "loss" is the objective's loss plus λ·repa (it goes negative as the cosine nears -1): the
    objective's own loss is shown too, loss − λ·repa, exact for the window means (a mean is linear)."""
    flow = np.array([1.2, 0.7, 0.5])
    repa = np.array([-0.3, -0.8, -0.95])
    records = [{"step": s, "loss": float(f + 1.5 * r), "repa": float(r), **statistics(s)}
               for s, f, r in zip((1, 2, 3), flow, repa)]
    steps, terms = read_loss_terms(write_metrics(tmp_path / "metrics.jsonl", records), {"repa": 1.5})
    assert list(terms) == ["loss", "objective", "repa"]
    # (f + 1.5 r) − 1.5 r in float64: within a rounding of |f| + 3|r| per value (a few ulps of 3)
    np.testing.assert_allclose(terms["objective"], flow, rtol=0, atol=4 * 2.0**-52 * 3)
    assert terms["loss"][-1] < 0  # the sum alone would hide that the objective's loss still falls
    figure = loss_figure(steps, terms)
    try:
        assert [axes.get_title() for axes in figure.axes] == [
            "loss (the sum that is optimised)", "the objective's own loss (the sum less the weighted terms below)", "repa"]
    finally:
        plt.close(figure)
    # Without weights, or a weight of a term not logged, nothing is derived.
    assert list(read_loss_terms(tmp_path / "metrics.jsonl")[1]) == ["loss", "repa"]
    assert list(read_loss_terms(tmp_path / "metrics.jsonl", {"disperse": 0.5})[1]) == ["loss", "repa"]
