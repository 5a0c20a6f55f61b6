"""`@figure`: a study's figure declared once; the drawer it makes saves the figure and its data
and describes it, and passes on 'nothing to draw'."""

from __future__ import annotations

import pandas as pd
import pytest

from normlab.studies.figures import draw_figures, figure, new_figure, require


@figure("E1", "loss_by_lr", "Loss by learning rate")
def loss_by_lr(results: pd.DataFrame):
    """Final training loss of each run
    against its learning rate; BN mode: train."""
    table = require(results)
    fig, axes = new_figure()
    axes[0][0].plot(table["lr"], table["loss"])
    return fig, table


@figure("R2", "computed", "A caption computed from a constant", caption="depth " + str(3))
def computed(results: pd.DataFrame):
    return None if results.empty else (new_figure()[0], results)


def test_the_drawer_saves_the_figure_and_its_data_and_describes_it(tmp_path):
    table = pd.DataFrame({"lr": [0.1, 1.0], "loss": [0.5, 2.0]})
    info = loss_by_lr(table, tmp_path)
    assert (info.experiment, info.name, info.title) == ("E1", "loss_by_lr", "Loss by learning rate")
    assert info.caption == ("Final training loss of each run against its learning rate; "
                            "BN mode: train.")
    assert sorted(info.files) == ["csv", "pdf", "png"]
    assert all(path.stat().st_size > 0 for path in info.files.values())
    pd.testing.assert_frame_equal(pd.read_csv(info.files["csv"]), table)


def test_a_given_caption_wins_and_none_draws_nothing(tmp_path):
    assert computed(pd.DataFrame(), tmp_path) is None
    assert computed(pd.DataFrame({"a": [1]}), tmp_path).caption == "depth 3"


def test_draw_figures_skips_a_declared_figure_with_nothing_to_draw(tmp_path):
    drawn = draw_figures(pd.DataFrame(), tmp_path, loss_by_lr, computed)
    assert drawn == []
    assert list(tmp_path.iterdir()) == []


def test_a_figure_without_caption_is_refused_where_it_is_declared():
    with pytest.raises(ValueError, match="'bare' needs a caption"):
        @figure("E1", "bare", "No caption")
        def bare(results):
            return None
