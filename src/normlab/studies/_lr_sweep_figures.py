"""The lr-sweep study's figures: p(diverge) vs lr with the frontier brackets, accuracy vs lr,
largest stable lr (per norm, vs depth), E1.

Each function returns a FigureInfo, or None when its runs are not in the results (e.g. a study
folder planned with a grid that has no E10 depths).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from normlab.studies._trains import (
    FRONTIER_DEFINITION,
    TRAINS_DEFINITION,
    TRAINS_MIN_TEST_ACC,
    point_table,
    stable_and_trained,
)
from normlab.studies.base import StudyResults
from normlab.studies.figures import (
    CENSORED,
    DIVERGED,
    NONE_QUALIFIED,
    NORM_COLORS,
    PANEL,
    Drawn,
    FigureInfo,
    diverged_strip,
    figure,
    label_axes,
    largest_lr_lines,
    mark_censored,
    mark_none,
    marker_legend,
    new_figure,
    norm_order,
    require,
    save_figure,
    saved_figure,
    separate_coinciding,
)

FRONTIER_GROUPS = ("sweep", "E10")  # the groups whose lr grids have a divergence frontier
# E1: (norm, lr) -> the paper's reported final test accuracy (%)
PAPER_E1 = {("batch", 0.1): 93.0, ("batch", 0.003): 90.5, ("batch", 0.0001): 81.0,
            ("none", 0.0001): 82.0}
_EVAL_MODE = "test accuracy with normalization in eval mode (running statistics)"


def _group(results: StudyResults, *groups: str) -> pd.DataFrame:
    runs = results.runs
    if runs.empty or "group" not in runs:
        return pd.DataFrame()
    return runs[runs["group"].isin(groups) & runs["status"].isin(["completed", "diverged"])]


def _setup(runs: pd.DataFrame) -> str:
    first = runs.iloc[0]
    return (f"{first['data']}, ResNet-{int(first['depth'])} of width {int(first['width'])}, "
            f"batch {int(first['batch_size'])}, {first['init']} init")


def divergence_table(results: StudyResults) -> pd.DataFrame:
    """p(diverge) per (depth, norm, lr) of the sweep and E10, with each curve's bracket."""
    runs = _group(results, *FRONTIER_GROUPS)
    if runs.empty:
        return pd.DataFrame()
    points = point_table(runs, ["depth", "norm"])
    brackets = stable_and_trained(runs, ["depth", "norm"])
    return points.merge(brackets[["depth", "norm", "largest_stable_lr",
                                  "smallest_always_diverged_lr"]], on=["depth", "norm"])


def divergence_vs_lr(results: StudyResults, fig_dir: Path) -> FigureInfo | None:
    """R1, E10: p(diverge) vs lr, one line per norm and one panel per depth, each curve's
    frontier bracket shaded (the edge band) and drawn as a bar in a strip below the panel."""
    table = require(divergence_table(results))
    depths = sorted(table["depth"].unique(), reverse=True)
    rows = max(table.groupby("depth")["norm"].nunique())
    fig, axes = new_figure(2, len(depths), sharex="col",
                           gridspec_kw={"height_ratios": [1.0, 0.1 + 0.05 * rows]})
    fig.set_size_inches(PANEL[0] * len(depths), PANEL[1] * (1.1 + 0.05 * rows))
    lrs = table["lr"].to_numpy(dtype=float)
    left, right = lrs.min() / 2, lrs.max() * 2
    for ax, strip, depth in zip(axes[0], axes[1], depths, strict=True):
        part = table[table["depth"] == depth]
        norms = norm_order(part["norm"])
        for row, norm in enumerate(norms):
            curve = part[part["norm"] == norm].sort_values("lr")
            color = NORM_COLORS.get(norm)
            ax.plot(curve["lr"], curve["p_diverge"], "o-", color=color, label=norm)
            for _, point in curve[(curve["p_diverge"] > 0) & (curve["p_diverge"] < 1)].iterrows():
                ax.annotate(f"{int(point['diverged'])}/{int(point['runs'])}",
                            (point["lr"], point["p_diverge"]), xytext=(3, 3),
                            textcoords="offset points", fontsize=6, color=color)
            low, high = curve[["largest_stable_lr", "smallest_always_diverged_lr"]].iloc[0]
            low = left if np.isnan(low) else low
            high = right if np.isnan(high) else high
            ax.axvspan(low, high, color=color, alpha=0.06, lw=0)
            strip.plot([low, high], [row, row], "-|", color=color, lw=2.5, markersize=5)
        hidden = separate_coinciding(ax)
        if hidden and ax is not axes[0, 0]:  # the legend (first panel) names the others
            ax.text(0.02, 0.97, "same curve (nudged): "
                    + ", ".join(f"{a} = {b}" for a, b in hidden.items()),
                    transform=ax.transAxes, ha="left", va="top", fontsize=6)
        ax.set_xlim(left, right)
        ax.set_ylim(-0.04, 1.04)
        ax.tick_params(axis="x", which="both", labelbottom=False)
        label_axes(ax, "", "p(diverge) over seeds and replicates",
                   f"Divergence vs learning rate, depth {int(depth)}", xlog=True)
        strip.set_ylim(len(norms) - 0.4, -0.6)
        strip.set_yticks([])
        label_axes(strip, "peak learning rate", "bracket")
    axes[0, 0].legend(loc="center left", title="shaded: edge band")
    data = table.rename(columns={"largest_stable_lr": "bracket_low",
                                 "smallest_always_diverged_lr": "bracket_high"})
    sweep = _group(results, "sweep")
    return saved_figure(fig, fig_dir, data, "R1", "divergence_vs_lr",
                        "Probability of divergence vs learning rate per norm and depth",
                        f"{FRONTIER_DEFINITION}. A run diverges when a mini-batch loss (train "
                        "mode) is non-finite or above diverge_loss. Points near a frontier are "
                        "measured over their seeds and perturbation replicates (initial weights "
                        "perturbed by a relative 1e-7), the others over their seeds; 'k/n' "
                        "beside an edge point: k of its n runs diverged. Shaded, and drawn as a "
                        "bar under each panel (one row per norm, in the legend's order): the "
                        "bracket from the largest lr with p = 0 to the smallest with p = 1 (to "
                        "the panel's edge where the grid has none). A curve equal to another "
                        "is drawn nudged by a few points and named '(= other)'."
                        + (f" {_setup(sweep)}." if len(sweep) else ""))


def accuracy_vs_lr(results: StudyResults, fig_dir: Path) -> FigureInfo | None:
    """R1: final test accuracy vs peak lr, one line per norm; diverged runs in a top strip."""
    sweep = require(_group(results, "sweep"))
    sweep = sweep.assign(test_acc=pd.to_numeric(sweep.get("test_acc"), errors="coerce"))
    fig, axes = new_figure()
    ax = axes[0, 0]
    norms = norm_order(sweep["norm"])
    used = []
    for row, norm in enumerate(norms):
        part = sweep[sweep["norm"] == norm]
        color = NORM_COLORS.get(norm)
        done = part[part["status"] == "completed"].groupby("lr")["test_acc"]
        if len(done):
            mean, low, high = done.mean(), done.min(), done.max()
            ax.plot(mean.index, mean.to_numpy(), "o-", color=color, label=norm)
            ax.fill_between(mean.index, low.to_numpy(), high.to_numpy(), color=color, alpha=0.2)
        else:
            ax.plot([], [], "o-", color=color, label=norm)
        diverged = part.loc[part["status"] == "diverged", "lr"]
        used += [DIVERGED] if diverged_strip(ax, diverged, color, row, len(norms)) else []
    ax.axhline(TRAINS_MIN_TEST_ACC, color="grey", ls=":", lw=0.8,
               label=f"trains: test acc >= {TRAINS_MIN_TEST_ACC:.0%}")
    ax.set_ylim(0, 1.0)
    label_axes(ax, "peak learning rate", "final test accuracy",
               "Final test accuracy vs learning rate", xlog=True)
    marker_legend(ax, used, ncol=2, loc="center left")
    columns = [c for c in ("norm", "lr", "seed", "depth", "status", "test_acc", "train_acc",
                           "diverged_step", "diverged_loss") if c in sweep]
    return saved_figure(fig, fig_dir, sweep[columns], "R1", "accuracy_vs_lr",
                        "Final test accuracy vs learning rate per norm",
                        f"Final {_EVAL_MODE} after the full schedule, vs the peak learning rate; "
                        f"mean over seeds, band min-max. x in the strip above the panel: the run "
                        f"diverged (a mini-batch loss non-finite or above diverge_loss), one row "
                        f"per norm ('xN': N seeds). Dotted: the 'trains' threshold. "
                        f"{_setup(sweep)}.")


def stable_lr_bars(results: StudyResults, fig_dir: Path) -> FigureInfo | None:
    """R1: the largest stable lr per norm, by the divergence and the "trains" criteria."""
    sweep = require(_group(results, "sweep"))
    table = stable_and_trained(sweep, ["norm"])
    norms = norm_order(sweep["norm"])
    floor = float(sweep["lr"].min()) / 3
    fig, axes = new_figure()
    ax = axes[0, 0]
    used: set[str] = set()
    criteria = (("largest_stable_lr", "stable_censored", "no divergence", "//", 0.45),
                ("largest_trained_lr", "trained_censored", "trains", None, 0.9))
    for offset, (column, censored, _, hatch, alpha) in zip((-0.2, 0.2), criteria,
                                                                strict=True):
        part = table.set_index("norm")
        for i, norm in enumerate(norms):
            value = part[column].get(norm, np.nan)
            color = NORM_COLORS.get(norm, "grey")
            if np.isnan(value):
                mark_none(ax, i + offset, color, filled=hatch is None)
                used.add(NONE_QUALIFIED)
                continue
            ax.bar(i + offset, value - floor, bottom=floor, width=0.38, color=color,
                   alpha=alpha, hatch=hatch, edgecolor="black", linewidth=0.5)
            if part[censored].get(norm, False):
                mark_censored(ax, i + offset - 0.15, value)
                used.add(CENSORED)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(np.arange(len(norms)), norms, rotation=20)
    label_axes(ax, "", "largest stable learning rate",
               "Largest stable learning rate per normalization")
    from matplotlib.patches import Patch

    marker_legend(ax, used, [(Patch(facecolor="grey", alpha=alpha, hatch=hatch,
                                    edgecolor="black", linewidth=0.5), label)
                             for _, _, label, hatch, alpha in criteria])
    return saved_figure(fig, fig_dir, table, "R1", "largest_stable_lr",
                        "Largest stable learning rate per norm",
                        "The largest learning rate of the grid with p(diverge) = 0 there and at "
                        "every smaller lr (over seeds and perturbation replicates: the frontier "
                        "bracket's low end). Hatched: no divergence (every mini-batch loss finite "
                        f"and <= diverge_loss, the paper's criterion); solid: the run also trains "
                        f"({TRAINS_DEFINITION}). '>=': stable at the largest lr tried, so the "
                        f"limit lies at or above the grid's end; a triangle: no lr of the grid "
                        f"qualified. {_setup(sweep)}.")


@figure("E10",
        "stable_lr_vs_depth",
        "Largest stable learning rate vs depth",
        "The largest learning rate of the grid with p(diverge) = 0 there and at "
        "every smaller lr (over seeds and perturbation replicates), for ResNets "
        "of several depths without normalization and with BN. Dashed: no "
        "divergence (the paper's criterion); solid: also trains "
        f"({TRAINS_DEFINITION}). '>=': stable at the largest lr tried (the limit "
        "lies at or above the grid's end); a triangle on the bottom edge: no lr "
        "of the grid was stable (open) or trained (filled).")
def stable_lr_vs_depth(results: StudyResults) -> Drawn:
    """E10: the largest stable lr vs depth, without normalization and with BN."""
    runs = _group(results, "sweep", "E10")
    runs = runs[runs["norm"].isin(["none", "batch"])] if not runs.empty else runs
    if runs.empty or runs["depth"].nunique() < 2:
        return None
    table = stable_and_trained(runs, ["norm", "depth"])
    fig, axes = new_figure()
    ax = axes[0, 0]
    used = largest_lr_lines(ax, table, "depth", "norm", column="largest_stable_lr",
                            censored="stable_censored", fmt="s--",
                            label="{}: no divergence", filled=False)
    used |= largest_lr_lines(ax, table, "depth", "norm", label="{}: trains")
    label_axes(ax, "depth (weight layers)", "largest stable learning rate",
               "Depth limits the learning rate (E10)")
    marker_legend(ax, used)
    return fig, table


def _e1_curves_table(results: StudyResults) -> pd.DataFrame:
    e1 = _group(results, "E1")
    if e1.empty:
        return pd.DataFrame()
    metrics = results.subset(list(e1["run_id"])).metrics()
    if metrics.empty or "kind" not in metrics:
        return pd.DataFrame()
    evals = metrics.loc[metrics["kind"] == "eval", ["run_id", "step", "train_acc", "test_acc"]]
    evals = evals.merge(e1[["run_id", "norm", "lr", "seed"]], on="run_id")
    total = evals.groupby("run_id")["step"].transform("max")
    return evals.assign(percent=100 * evals["step"] / total)


def e1_curves(results: StudyResults, fig_dir: Path) -> FigureInfo | None:
    """E1: train and test accuracy vs % of training, and final test accuracy vs the paper's."""
    curves = require(_e1_curves_table(results))
    fig, axes = new_figure(1, 3)
    runs = sorted({(n, float(lr)) for n, lr in zip(curves["norm"], curves["lr"], strict=True)},
                  key=lambda k: (k[0] != "batch", -k[1]))
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "d")]
    finals = []
    for i, (norm, lr) in enumerate(runs):
        part = curves[(curves["norm"] == norm) & (curves["lr"] == lr)]
        mean = part.groupby("percent")[["train_acc", "test_acc"]].mean()
        label = f"{'BN' if norm == 'batch' else 'no norm'}, lr {lr:g}"
        for ax, column in zip(axes[0, :2], ("train_acc", "test_acc"), strict=True):
            line, marker = styles[i % len(styles)]
            ax.plot(mean.index, mean[column], line, marker=marker,
                    markevery=max(1, len(mean) // 8), color=NORM_COLORS.get(norm), label=label)
        last = part[part["percent"] == 100]["test_acc"].mean()
        finals.append({"run": label, "norm": norm, "lr": lr, "measured": 100 * last,
                       "paper": PAPER_E1.get((norm, lr), np.nan)})
    for ax, what in zip(axes[0, :2], ("train accuracy (train mode)",
                                      "test accuracy (eval mode)"), strict=True):
        ax.set_xlabel("% of training")
        ax.set_ylabel(what)
        ax.set_ylim(0, 1.02)
    separate_coinciding(axes[0, 1])
    marker_legend(axes[0, 0], [], handlelength=3.5)
    axes[0, 0].set_title("E1: train accuracy")
    axes[0, 1].set_title("E1: test accuracy")
    final = pd.DataFrame(finals)
    ax = axes[0, 2]
    y = np.arange(len(final))
    ax.barh(y + 0.2, final["measured"], height=0.38, color=[NORM_COLORS.get(n)
                                                            for n in final["norm"]],
            label="measured")
    ax.barh(y - 0.2, final["paper"], height=0.38, color="lightgrey", edgecolor="black",
            linewidth=0.5, label="paper (CIFAR-10, ResNet-110)")
    for yi, (m, p) in enumerate(zip(final["measured"], final["paper"], strict=True)):
        ax.text(m + 1, yi + 0.2, f"{m:.1f}", va="center", fontsize=6)
        if not np.isnan(p):
            ax.text(p + 1, yi - 0.2, f"{p:g}", va="center", fontsize=6)
    ax.set_yticks(y, final["run"])
    ax.set_xlim(0, 110)
    ax.set_xlabel("final test accuracy (%)")
    ax.set_title("E1: final accuracy, paper vs measured")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    data = curves.merge(final[["norm", "lr", "measured", "paper"]], on=["norm", "lr"])
    files = save_figure(fig, fig_dir, "e1_accuracy", data.rename(columns={
        "measured": "final_test_acc_measured_pct", "paper": "final_test_acc_paper_pct"}))
    return FigureInfo("E1", "e1_accuracy", "E1: BN's benefit is the large learning rate",
                      "BN at lr 0.1, 0.003, 0.0001 and no normalization at 0.0001, each run "
                      "with its own length, against % of training. Train accuracy: running "
                      "average of mini-batch accuracy in train mode (batch statistics, augmented "
                      f"data); {_EVAL_MODE}. Right: final test accuracy beside the paper's "
                      "(93, 90.5, 81, 82 %, CIFAR-10 ResNet-110); the smoke scale uses other data "
                      "and a far smaller model, so compare the ordering, not the values.", files)
