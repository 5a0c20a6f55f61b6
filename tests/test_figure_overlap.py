"""No series hidden under another: a line with the same points as an earlier one is nudged
apart and named in the legend (issue 22: one of E10's four lines lay under another)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from normlab.studies import _lr_sweep_figures as sweep_figures
from normlab.studies.base import StudyResults
from normlab.studies.figures import (
    coinciding,
    marker_legend,
    new_figure,
    plot_series,
    separate_coinciding,
)


def test_coinciding_names_each_curve_equal_to_an_earlier_one():
    nan = float("nan")
    curves = [("group", [1, 2], [0.5, nan]), ("layer", [1, 2], [0.5, nan]),
              ("batch", [1, 2], [0.5, 0.6]), ("instance", [1, 2], [0.5, nan]),
              ("none", [1, 2, 3], [0.5, nan, 1.0])]
    assert coinciding(curves) == {"layer": "group", "instance": "group"}


def _display_points(line) -> np.ndarray:
    return line.get_transform().transform(np.column_stack([line.get_xdata(),
                                                           line.get_ydata()]))


def test_two_norms_with_identical_values_are_both_visible_and_named():
    table = pd.DataFrame({"norm": ["group"] * 3 + ["layer"] * 3 + ["batch"] * 3,
                          "batch_size": [2, 8, 32] * 3,
                          "test_acc": [0.5, 0.6, 0.7, 0.5, 0.6, 0.7, 0.4, 0.6, 0.9]})
    _fig, axes = new_figure()
    ax = axes[0][0]
    plot_series(ax, table, "batch_size", "test_acc", "norm")
    marker_legend(ax, [])
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["batch", "group", "layer (= group)"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    group = _display_points(lines["group"])
    layer = _display_points(lines["layer (= group)"])
    assert np.all(np.abs(layer - group) > 1)  # a few pixels apart at every point
    np.testing.assert_array_equal(lines["layer (= group)"].get_ydata(), [0.5, 0.6, 0.7])
    marker_legend(ax, [])  # a second legend call does not nudge again
    np.testing.assert_array_equal(_display_points(lines["layer (= group)"]), layer)


def _runs(rows: list[tuple]) -> pd.DataFrame:
    columns = ["run_id", "group", "norm", "depth", "lr", "seed", "status", "test_acc"]
    return pd.DataFrame(rows, columns=columns).assign(
        data="digits", width=8, batch_size=64, init="xavier_normal")


def _curve(norm: str, depth: int, group: str, outcomes: dict[float, float | None]
           ) -> list[tuple]:
    return [(f"{group}-{norm}-{lr}-{depth}", group, norm, depth, lr, 0,
             "diverged" if acc is None else "completed", np.nan if acc is None else acc)
            for lr, acc in outcomes.items()]


def test_the_e10_figure_names_bns_trains_line_lying_on_its_no_divergence_line(tmp_path):
    # BN is stable and trains at every lr at both depths: its two lines coincide
    rows = []
    for depth, group in ((8, "sweep"), (20, "E10")):
        rows += _curve("batch", depth, group, {0.1: 0.9, 1.0: 0.9})
        rows += _curve("none", depth, group, {0.1: 0.5, 1.0: None})
    draw = sweep_figures.stable_lr_vs_depth.__wrapped__
    fig, _ = draw(StudyResults(tmp_path, _runs(rows)))
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "batch: trains (= batch: no divergence)" in texts
    assert "none: trains (= none: no divergence)" in texts


def test_the_divergence_figure_names_norms_with_the_same_curve(tmp_path, monkeypatch):
    rows = []
    for norm, outcomes in (("batch", {0.1: 0.9, 1.0: 0.9, 10.0: None}),
                           ("group", {0.1: 0.9, 1.0: 0.9, 10.0: None}),
                           ("none", {0.1: 0.5, 1.0: None, 10.0: None})):
        rows += _curve(norm, 20, "sweep", outcomes)
        rows += _curve(norm, 8, "E10", outcomes) if norm != "group" else []
        rows += _curve("layer", 8, "E10", outcomes) if norm == "group" else []
    drawn = []
    monkeypatch.setattr(sweep_figures, "saved_figure",
                        lambda fig, *args: drawn.append(fig) or None)
    sweep_figures.divergence_vs_lr(StudyResults(tmp_path, _runs(rows)), tmp_path)
    first, second = drawn[0].axes[0], drawn[0].axes[1]  # depth 20 (legend), depth 8
    assert [t.get_text() for t in first.get_legend().get_texts()] == [
        "none", "batch", "group (= batch)"]
    assert "layer = batch" in [t.get_text() for t in second.texts]


def test_a_zero_nudge_names_the_hidden_line_and_leaves_it_on_its_data():
    _fig, axes = new_figure()
    ax = axes[0][0]
    ax.plot([1, 2], [3, 4], label="a")
    ax.plot([1, 2], [3, 4], label="b")
    assert separate_coinciding(ax, 0.0) == {"b": "a"}
    a, b = ax.get_lines()
    np.testing.assert_allclose(_display_points(a), _display_points(b))
