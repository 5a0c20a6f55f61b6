"""No series hidden under another: a line with the same points as an earlier one is nudged
apart and named in the legend (issue 22: one of E10's four lines lay under another)."""

from __future__ import annotations

import numpy as np
import pandas as pd

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


def display_points(line) -> np.ndarray:
    """A line's points in display coordinates (pixels), after any nudge."""
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
    group = display_points(lines["group"])
    layer = display_points(lines["layer (= group)"])
    assert np.all(np.abs(layer - group) > 1)  # a few pixels apart at every point
    np.testing.assert_array_equal(lines["layer (= group)"].get_ydata(), [0.5, 0.6, 0.7])
    marker_legend(ax, [])  # a second legend call does not nudge again
    np.testing.assert_array_equal(display_points(lines["layer (= group)"]), layer)


def test_a_zero_nudge_names_the_hidden_line_and_leaves_it_on_its_data():
    _fig, axes = new_figure()
    ax = axes[0][0]
    ax.plot([1, 2], [3, 4], label="a")
    ax.plot([1, 2], [3, 4], label="b")
    assert separate_coinciding(ax, 0.0) == {"b": "a"}
    a, b = ax.get_lines()
    np.testing.assert_allclose(display_points(a), display_points(b))
