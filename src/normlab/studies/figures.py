"""The figure code every study shares: one style, one set of markers, every figure saved as PNG,
PDF and CSV.

Style: panels of PANEL inches (COMPACT for grids of small multiples), the fonts of STYLE, one
colour per norm / init / batch size, and three markers with one meaning everywhere:
- "x" in a thin strip above a panel: a run that diverged (one row per series, so markers of
  different series never sit on one another; a number beside it when several runs diverged at
  that x);
- ">=" beside a point: a censored limit (stable at the largest lr tried, so the true limit lies
  at or above it);
- an open triangle on the bottom edge: no lr of the grid qualified.
Each marker used in a panel gets its own legend entry (`marker_legend`). A line whose points
equal an earlier line's would hide under it: it is drawn nudged diagonally by a few points and
its legend entry says which line it coincides with (`separate_coinciding`, which `marker_legend`
applies).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class FigureInfo:
    """A figure in the report: the experiment it answers, a caption stating BN mode and quantity.

    `error` is set instead of `files` when the figure could not be drawn; the report shows it.
    """

    experiment: str
    name: str
    title: str
    caption: str
    files: dict[str, Path] = field(default_factory=dict)
    error: str | None = None


NORM_COLORS = {  # one colour per normalization kind, the same in every figure
    "none": "#d62728",
    "batch": "#1f77b4",
    "group": "#2ca02c",
    "layer": "#9467bd",
    "instance": "#8c564b",
    "batch_renorm": "#ff7f0e",
}
INIT_COLORS = {"xavier_normal": "#1f77b4", "kaiming_normal": "#d62728", "orthogonal": "#2ca02c",
               "delta_orthogonal": "#9467bd"}
SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
PANEL = (4.0, 3.2)  # inches per panel
COMPACT = (3.0, 2.4)  # inches per panel in grids of small multiples
STYLE = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "legend.fontsize": 7, "legend.framealpha": 0.8,
         "lines.linewidth": 1.3, "lines.markersize": 4, "figure.dpi": 100}
DIVERGED, CENSORED, NONE_QUALIFIED = "diverged", "censored", "none"


def new_figure(nrows: int = 1, ncols: int = 1, *, compact: bool = False, **kwargs: Any):
    """A matplotlib figure on the Agg backend in the shared style, sized per panel.

    Returns (fig, axes) with axes a 2-D array (`squeeze=False`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    width, height = COMPACT if compact else PANEL
    kwargs.setdefault("squeeze", False)
    kwargs.setdefault("constrained_layout", True)
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), **kwargs)


def save_figure(fig: Any, out_dir: str | Path, name: str, data: pd.DataFrame) -> dict[str, Path]:
    """Save `fig` as <name>.png (report), <name>.pdf (papers) and its data as <name>.csv.

    Closes the figure. Returns the paths by extension.
    """
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("png", "pdf", "csv")}
    fig.savefig(paths["png"], dpi=150)
    fig.savefig(paths["pdf"])
    plt.close(fig)
    data.to_csv(paths["csv"], index=False)
    return paths


def norm_order(norms: Iterable[str]) -> list[str]:
    """The norms present, in NORM_COLORS' order, then any others sorted."""
    present = set(norms)
    known = [n for n in NORM_COLORS if n in present]
    return known + sorted(present - set(known))


def color_of(key: Any) -> str | None:
    """The shared colour of a norm or init name (None: matplotlib's cycle)."""
    return NORM_COLORS.get(key) or INIT_COLORS.get(key)


def plot_series(ax: Any, table: pd.DataFrame, x: str, y: str, by: str, *, fmt: str = "o-",
                colors: Mapping[Any, str] | None = None, label: str = "{}") -> None:
    """One line of `y` against `x` per value of `by` (sorted by x), coloured by the shared maps
    (or `colors`), labelled `label.format(value)`."""
    keys = norm_order(table[by]) if by == "norm" else sorted(table[by].unique())
    for i, key in enumerate(keys):
        part = table[table[by] == key].sort_values(x)
        color = (colors or {}).get(key) or color_of(key) or SERIES_COLORS[i % len(SERIES_COLORS)]
        ax.plot(part[x], part[y], fmt, color=color, label=label.format(key))


def label_axes(ax: Any, xlabel: str, ylabel: str, title: str = "", *, xlog: bool = False,
               ylog: bool = False) -> None:
    """Labels, title and log scales of one panel."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, pad=getattr(ax, "_title_pad", None))
    if xlog:
        ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")


def log_y_if_positive(ax: Any, values: pd.Series) -> None:
    """A log y axis for a column of learning rates, unless none is positive (no run qualified),
    where matplotlib would refuse to draw."""
    if (pd.to_numeric(values, errors="coerce") > 0).any():
        ax.set_yscale("log")


def diverged_strip(ax: Any, xs: Iterable[float], color: str | None, row: int,
                   rows: int) -> bool:
    """Mark diverged runs at `xs` with "x" in a strip just above `ax` (its own thin axes,
    sharing x), on row `row` of `rows` (one row per series, so series never overlap); "xN"
    where N runs share an x. Returns whether anything was marked."""
    counts = pd.Series(list(xs), dtype=float).value_counts()
    if counts.empty:
        return False
    strip = _strip_axes(ax, rows)
    strip.scatter(counts.index, np.full(len(counts), row), marker="x", s=24, color=color,
                  clip_on=False)
    for x, n in counts.items():
        if n > 1:
            strip.annotate(f"{n}", (x, row), xytext=(4, 0), textcoords="offset points",
                           fontsize=6, va="center", color=color)
    return True


def _strip_axes(ax: Any, rows: int) -> Any:
    """The thin axes above `ax` that holds its diverged markers (made on first use)."""
    strip = getattr(ax, "_diverged_strip", None)
    if strip is None:
        height = 0.028 * max(rows, 2) + 0.02
        strip = ax.inset_axes([0.0, 1.015, 1.0, height], sharex=ax)
        strip.set_ylim(rows + 0.2, -0.8)
        strip.set_yticks([])
        strip.tick_params(axis="x", labelbottom=False, length=0)
        strip.set_ylabel("diverged", rotation=0, ha="right", va="center", fontsize=7)
        for side in strip.spines.values():
            side.set_color("#bbbbbb")
        ax._title_pad = 6 + height * 170  # points (a panel is ~170 points high): clear the strip
        ax.set_title(ax.get_title(), pad=ax._title_pad)
        ax._diverged_strip = strip
    return strip


def mark_censored(ax: Any, x: Any, y: float, color: str | None = "black") -> None:
    """A ">=" beside a censored limit at (x, y): the true value lies at or above it."""
    ax.annotate(">=", (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8,
                fontweight="bold", color=color)


def mark_none(ax: Any, x: Any, color: str | None, filled: bool = True, slot: int = 0,
              slots: int = 1) -> None:
    """An open (or filled) triangle on the bottom edge at `x`: no lr of the grid qualified.
    Series `slot` of `slots` is nudged sideways so that triangles at one x do not overlap."""
    from matplotlib.transforms import ScaledTranslation

    nudge = ScaledTranslation((slot - (slots - 1) / 2) * 7 / 72, 0, ax.figure.dpi_scale_trans)
    ax.scatter([x], [0.02], marker="v", s=40, transform=ax.get_xaxis_transform() + nudge,
               edgecolors=color, facecolors=color if filled else "none", clip_on=False, zorder=4)


def coinciding(curves: Iterable[tuple[Any, Iterable[float], Iterable[float]]]
               ) -> dict[Any, Any]:
    """key -> the key of the first earlier curve with exactly the same points, for each curve
    (key, xs, ys) that would be drawn on top of another (NaN equal to NaN)."""
    seen: list[tuple[Any, np.ndarray]] = []
    out = {}
    for key, xs, ys in curves:
        points = np.array([list(xs), list(ys)], dtype=float)
        same = next((k for k, p in seen if p.shape == points.shape
                     and np.array_equal(p, points, equal_nan=True)), None)
        if same is None:
            seen.append((key, points))
        else:
            out[key] = same
    return out


def separate_coinciding(ax: Any, nudge_points: float = 2.5) -> dict[str, str]:
    """Keep every labelled line of `ax` visible: a line with the same points as an earlier one
    is nudged diagonally by `nudge_points` per line already at that place (its data unchanged),
    and its label gains "(= <the earlier label>)" for the legend. Returns {hidden label: the
    label it coincides with}, with the labels as they were."""
    from matplotlib.transforms import ScaledTranslation

    lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    labels = {id(line): line.get_label() for line in lines}
    same = coinciding((id(line), line.get_xdata(), line.get_ydata()) for line in lines)
    stacked: dict[int, int] = {}
    for line in lines:
        first = same.get(id(line))
        if first is None or getattr(line, "_nudged", False):  # nudged by an earlier call
            continue
        line._nudged = True
        stacked[first] = stacked.get(first, 0) + 1
        step = stacked[first] * nudge_points / 72
        line.set_transform(line.get_transform()
                           + ScaledTranslation(step, step, ax.figure.dpi_scale_trans))
        line.set_label(f"{labels[id(line)]} (= {labels[first]})")
    return {labels[k]: labels[v] for k, v in same.items()}


def marker_legend(ax: Any, used: Iterable[str], extra: Iterable[tuple[Any, str]] = (),
                  **kwargs: Any) -> None:
    """The legend of `ax`: its labelled artists (lines that coincide nudged apart and named, see
    `separate_coinciding`), the `extra` (handle, label) pairs, and one grey entry per shared
    marker used ("diverged", "censored", "none")."""
    from matplotlib.lines import Line2D

    separate_coinciding(ax)

    texts = {DIVERGED: ("x", "diverged (strip above)"),
             CENSORED: ("$\\geq$", ">= : limit at or above the largest lr tried"),
             NONE_QUALIFIED: ("v", "no lr of the grid qualified")}
    handles, labels = ax.get_legend_handles_labels()
    for handle, label in extra:
        handles.append(handle)
        labels.append(label)
    for key in dict.fromkeys(used):
        marker, text = texts[key]
        handles.append(Line2D([], [], ls="", marker=marker, color="grey", markersize=6,
                              markerfacecolor="none" if key == NONE_QUALIFIED else "grey"))
        labels.append(text)
    ax.legend(handles, labels, **kwargs)


def largest_lr_lines(ax: Any, table: pd.DataFrame, x: str, by: str, *,
                     column: str = "largest_trained_lr", censored: str = "trained_censored",
                     fmt: str = "o-", label: str = "{}", filled: bool = True) -> set[str]:
    """Plot a largest-lr column (see studies._trains.stable_and_trained) against `x`, one line
    per value of `by`: ">=" at censored points, a triangle where no lr qualified. Returns the
    shared markers used, for `marker_legend`."""
    used: set[str] = set()
    plot_series(ax, table, x, column, by, fmt=fmt, label=label)
    keys = norm_order(table[by]) if by == "norm" else sorted(table[by].unique())
    for i, key in enumerate(keys):
        part = table[table[by] == key]
        color = color_of(key) or SERIES_COLORS[i % len(SERIES_COLORS)]
        for _, row in part.iterrows():
            if np.isnan(row[column]):
                mark_none(ax, row[x], color, filled, i, len(keys))
                used.add(NONE_QUALIFIED)
            elif bool(row[censored]):
                mark_censored(ax, row[x], row[column], color)
                used.add(CENSORED)
    xs = pd.to_numeric(table[x], errors="coerce").dropna().to_numpy(dtype=float)
    ax.dataLim.update_from_data_x(xs, ignore=False)  # the x range even where no lr qualified
    ax.autoscale_view()
    log_y_if_positive(ax, table[column])
    ax.margins(x=0.08, y=0.12)  # room for the ">=" marks
    return used


def grouped_bars(ax: Any, table: pd.DataFrame, x: str, member: str, members: Iterable[Any], *,
                 column: str = "largest_trained_lr", censored: str = "trained_censored",
                 colors: Mapping[Any, str] | None = None,
                 labels: Mapping[Any, str] | None = None) -> set[str]:
    """Bars of `column`: one group per value of `x`, one bar per entry of `members` (the values
    of column `member`), ">=" on censored bars, a triangle where the value is NaN. Returns the
    shared markers used, for `marker_legend`."""
    members = list(members)
    groups = norm_order(table[x]) if x == "norm" else sorted(table[x].unique())
    width = 0.8 / max(1, len(members))
    used: set[str] = set()
    for i, key in enumerate(members):
        part = table[table[member] == key].set_index(x)
        color = (colors or {}).get(key) or color_of(key) or SERIES_COLORS[i % len(SERIES_COLORS)]
        where = np.arange(len(groups)) + (i - (len(members) - 1) / 2) * width
        values = np.array([part[column].get(g, np.nan) for g in groups], dtype=float)
        ax.bar(where, values, width, color=color, label=(labels or {}).get(key, str(key)))
        for w, g, value in zip(where, groups, values, strict=True):
            if np.isnan(value):
                mark_none(ax, w, color)
                used.add(NONE_QUALIFIED)
            elif bool(part[censored].get(g, False)):
                mark_censored(ax, w - width / 2, value)
                used.add(CENSORED)
    ax.set_xticks(np.arange(len(groups)), groups)
    log_y_if_positive(ax, table[column])
    return used


def largest_lr_figure(table: pd.DataFrame, x: str, xlabel: str, *, log_base: int = 10,
                      extra: Any = None) -> Any:
    """A one-panel figure of the largest lr that trains against `x`, one line per norm, with
    ">=" and triangle marks and their legend; `extra(ax)` draws more before the legend."""
    fig, axes = new_figure()
    ax = axes[0][0]
    used = largest_lr_lines(ax, table, x, "norm")
    if extra is not None:
        extra(ax)
    ax.set_xscale("log", base=log_base)
    label_axes(ax, xlabel, "largest lr that trains")
    marker_legend(ax, used)
    return fig


class NothingToDraw(Exception):
    """Raised by a drawer whose runs are not in the results; `draw_figures` skips it."""


def require(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame`, or NothingToDraw when it is empty (a drawer's first line)."""
    if frame.empty:
        raise NothingToDraw
    return frame


def saved_figure(fig: Any, fig_dir: Path, data: pd.DataFrame, experiment: str, name: str,
                 title: str, caption: str) -> FigureInfo:
    """Save `fig` and its `data` as `name` (PNG, PDF, CSV; see save_figure) and
    describe it for the report."""
    return FigureInfo(experiment, name, title, caption, save_figure(fig, fig_dir, name, data))


Drawn = tuple[Any, pd.DataFrame] | None  # what a `@figure` drawer returns: (figure, its data)


def figure(experiment: str, name: str, title: str, caption: str | None = None
           ) -> Callable[[Callable[[Any], Drawn]], Callable[[Any, Path], FigureInfo | None]]:
    """Declare a study's figure: the decorated `draw(results)` returns the matplotlib figure and
    the data it shows (or None, or raises NothingToDraw, when its runs are not in the results);
    the drawer it becomes, `drawer(results, fig_dir)`, saves both as `name` (PNG, PDF, CSV; see
    `save_figure`) and describes them for the report: experiment id, title, and the caption
    (by default the docstring of `draw`, which says what the figure shows)."""

    def declare(draw: Callable[[Any], Drawn]) -> Callable[[Any, Path], FigureInfo | None]:
        text = caption if caption is not None else " ".join((draw.__doc__ or "").split())
        if not text:
            raise ValueError(f"figure {name!r} needs a caption: pass one or write a docstring.")

        @functools.wraps(draw)
        def drawer(results: Any, fig_dir: Path) -> FigureInfo | None:
            drawn = draw(results)
            if drawn is None:
                return None
            fig, data = drawn
            return saved_figure(fig, Path(fig_dir), data, experiment, name, title, text)

        return drawer

    return declare


def draw_figures(results: Any, fig_dir: Path,
                 *drawers: Callable[[Any, Path], Any]) -> list[FigureInfo]:
    """Each drawer's figures: a drawer returns a FigureInfo or a list of them, and returns None
    or raises NothingToDraw (see `require`) when its runs are not in the results."""
    out: list[FigureInfo] = []
    for draw in drawers:
        try:
            drawn = draw(results, Path(fig_dir))
        except NothingToDraw:
            continue
        out += drawn if isinstance(drawn, list) else [] if drawn is None else [drawn]
    return out
