"""The lr-sweep study's figures: accuracy vs lr, largest stable lr (per norm, vs depth), E1.

Each function returns a FigureInfo, or None when its runs are not in the results (e.g. a study
folder planned with a grid that has no E10 depths).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from normlab.report.figures import NORM_COLORS, new_figure, save_figure
from normlab.studies._stable_lr import largest_stable_lr
from normlab.studies.base import FigureInfo, StudyResults

_EVAL_MODE = "test accuracy with normalization in eval mode (running statistics)"


def _group(results: StudyResults, *groups: str) -> pd.DataFrame:
    runs = results.runs
    if runs.empty or "group" not in runs:
        return pd.DataFrame()
    return runs[runs["group"].isin(groups) & runs["status"].isin(["completed", "diverged"])]


def _norm_order(norms) -> list[str]:
    known = [n for n in NORM_COLORS if n in set(norms)]
    return known + sorted(set(norms) - set(known))


def _setup(runs: pd.DataFrame) -> str:
    first = runs.iloc[0]
    return (f"{first['data']}, ResNet-{int(first['depth'])} of width {int(first['width'])}, "
            f"batch {int(first['batch_size'])}, {first['init']} init")


def accuracy_vs_lr(results: StudyResults, fig_dir: Path) -> FigureInfo | None:
    """R1: final test accuracy vs peak lr, one line per norm; diverged runs marked x at 0."""
    sweep = _group(results, "sweep")
    if sweep.empty:
        return None
    sweep = sweep.assign(test_acc=pd.to_numeric(sweep.get("test_acc"), errors="coerce"))
    fig, axes = new_figure(width=5.5, height=3.8)
    ax = axes[0, 0]
    norms = _norm_order(sweep["norm"])
    for i, norm in enumerate(norms):
        part = sweep[sweep["norm"] == norm]
        color = NORM_COLORS.get(norm)
        done = part[part["status"] == "completed"].groupby("lr")["test_acc"]
        if len(done):
            mean, low, high = done.mean(), done.min(), done.max()
            ax.plot(mean.index, mean.to_numpy(), "o-", color=color, label=norm, ms=4)
            ax.fill_between(mean.index, low.to_numpy(), high.to_numpy(), color=color, alpha=0.2)
        diverged = part.loc[part["status"] == "diverged", "lr"].unique()
        nudge = 10 ** (0.04 * (i - (len(norms) - 1) / 2))  # side by side, not on top
        ax.scatter(diverged * nudge, np.zeros(len(diverged)), marker="x", s=40, color=color,
                   label=None if len(done) else norm)
    ax.set_xscale("log")
    ax.set_ylim(-0.04, 1.02)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Final test accuracy vs learning rate")
    ax.legend(fontsize=7, ncol=2)
    columns = [c for c in ("norm", "lr", "seed", "depth", "status", "test_acc", "train_acc",
                           "diverged_step", "diverged_loss") if c in sweep]
    files = save_figure(fig, fig_dir, "accuracy_vs_lr", sweep[columns])
    return FigureInfo("R1", "accuracy_vs_lr", "Final test accuracy vs learning rate per norm",
                      f"Final {_EVAL_MODE} after the full schedule, vs the peak learning rate; "
                      f"mean over seeds, band min-max. x at 0: the run diverged (a mini-batch "
                      f"loss non-finite or above diverge_loss), nudged sideways per norm. "
                      f"{_setup(sweep)}.", files)


def worst_seed(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """One row per setting of `by` and lr: "diverged" if any seed diverged, else "completed",
    with the lowest test accuracy over seeds. An lr is then stable only if every seed was."""
    done = runs[runs["status"].isin(["completed", "diverged"])]
    if done.empty:
        return done
    acc = pd.to_numeric(done["test_acc"], errors="coerce") if "test_acc" in done else np.nan
    grouped = done.assign(test_acc=acc, diverged=done["status"].eq("diverged")).groupby(
        [*by, "lr"], dropna=False)
    table = grouped.agg(diverged=("diverged", "any"), test_acc=("test_acc", "min"))
    table["status"] = np.where(table["diverged"], "diverged", "completed")
    return table.drop(columns="diverged").reset_index()


def _both_criteria(runs: pd.DataFrame, by: list[str], trains_acc: float) -> pd.DataFrame:
    """largest_stable_lr (every seed stable) by both criteria, stacked, with `censored`:
    stable at the grid's top."""
    worst = worst_seed(runs, by)
    no_div = largest_stable_lr(worst, by).assign(criterion="no divergence")
    trains = largest_stable_lr(worst, by, min_test_acc=trains_acc).assign(
        criterion=f"trains (test acc >= {trains_acc:.0%})")
    table = pd.concat([no_div, trains], ignore_index=True)
    top = runs.groupby(by)["lr"].max().rename("largest_lr_tried").reset_index()
    table = table.merge(top, on=by, how="left")
    return table.assign(censored=table["largest_stable_lr"] == table["largest_lr_tried"])


def stable_lr_bars(results: StudyResults, fig_dir: Path, trains_acc: float
                   ) -> FigureInfo | None:
    """R1: the largest stable lr per norm, by the divergence and the "trains" criteria."""
    sweep = _group(results, "sweep")
    if sweep.empty:
        return None
    table = _both_criteria(sweep, ["norm"], trains_acc)
    norms = _norm_order(sweep["norm"])
    floor = float(sweep["lr"].min()) / 3
    fig, axes = new_figure(width=5.5, height=3.6)
    ax = axes[0, 0]
    x = np.arange(len(norms))
    labelled: set[str] = set()
    for offset, (criterion, part) in zip((-0.2, 0.2), table.groupby("criterion", sort=False),
                                         strict=False):
        part = part.set_index("norm")
        hatch = "//" if criterion == "no divergence" else None
        for i, norm in enumerate(norms):
            value = part["largest_stable_lr"].get(norm, np.nan)
            color = NORM_COLORS.get(norm, "grey")
            if np.isnan(value):
                ax.text(i + offset, floor * 1.2, "none", ha="center", fontsize=6, rotation=90)
                continue
            ax.bar(i + offset, value - floor, bottom=floor, width=0.38, color=color,
                   alpha=0.45 if hatch else 0.9, hatch=hatch, edgecolor="black", linewidth=0.5,
                   label=None if criterion in labelled else criterion)
            labelled.add(criterion)
            if part["censored"].get(norm, False):
                ax.text(i + offset, value * 1.15, ">=", ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(x, norms, rotation=20)
    ax.set_ylabel("largest stable learning rate")
    ax.set_title("Largest stable learning rate per normalization")
    ax.legend(fontsize=7)
    files = save_figure(fig, fig_dir, "largest_stable_lr", table)
    return FigureInfo("R1", "largest_stable_lr", "Largest stable learning rate per norm",
                      "The largest learning rate of the grid at which every seed was stable. "
                      "Hatched: no divergence (every mini-batch loss finite and <= "
                      f"diverge_loss, the paper's criterion); solid: the run also trains (final "
                      f"{_EVAL_MODE} >= {trains_acc:.0%}). '>=': stable at the largest lr "
                      f"tried, so the limit lies above the grid. {_setup(sweep)}.", files)


def stable_lr_vs_depth(results: StudyResults, fig_dir: Path, trains_acc: float
                       ) -> FigureInfo | None:
    """E10: the largest stable lr vs depth, without normalization and with BN."""
    runs = _group(results, "sweep", "E10")
    runs = runs[runs["norm"].isin(["none", "batch"])] if not runs.empty else runs
    if runs.empty or runs["depth"].nunique() < 2:
        return None
    table = _both_criteria(runs, ["norm", "depth"], trains_acc)
    fig, axes = new_figure(width=4.8, height=3.6)
    ax = axes[0, 0]
    floor = float(runs["lr"].min()) / 2
    for (norm, criterion), part in table.groupby(["norm", "criterion"], sort=False):
        part = part.sort_values("depth")
        no_div = criterion == "no divergence"
        depth = part["depth"] + (0.3 if norm == "none" else -0.3)  # side by side
        color = NORM_COLORS.get(norm)
        ax.plot(depth, part["largest_stable_lr"], "--" if no_div else "-",
                marker="s" if no_div else "o", color=color, label=f"{norm}: {criterion}")
        missing = part["largest_stable_lr"].isna().to_numpy()
        ax.scatter(depth[missing], np.full(missing.sum(), floor), marker="v", s=45,
                   color=color, facecolors="none" if no_div else color)
    ax.set_yscale("log")
    ax.set_xlabel("depth (weight layers)")
    ax.set_ylabel("largest stable learning rate")
    ax.set_title("Depth limits the learning rate (E10)")
    ax.legend(fontsize=7)
    files = save_figure(fig, fig_dir, "stable_lr_vs_depth", table)
    return FigureInfo("E10", "stable_lr_vs_depth", "Largest stable learning rate vs depth",
                      "The largest learning rate of the grid at which every seed was stable, "
                      "for ResNets of several depths without normalization and with BN. Dashed: "
                      "no divergence (the paper's criterion); solid: also trains (final "
                      f"{_EVAL_MODE} >= {trains_acc:.0%}). A triangle at the bottom: no lr of the "
                      "grid was stable.", files)


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


def e1_curves(results: StudyResults, fig_dir: Path, paper: dict[tuple[str, float], float]
              ) -> FigureInfo | None:
    """E1: train and test accuracy vs % of training, and final test accuracy vs the paper's."""
    curves = _e1_curves_table(results)
    if curves.empty:
        return None
    fig, axes = new_figure(1, 3, width=4.0, height=3.4)
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
            ax.plot(mean.index, mean[column], line, marker=marker, ms=3,
                    markevery=max(1, len(mean) // 8), color=NORM_COLORS.get(norm), label=label)
        last = part[part["percent"] == 100]["test_acc"].mean()
        finals.append({"run": label, "norm": norm, "lr": lr, "measured": 100 * last,
                       "paper": paper.get((norm, lr), np.nan)})
    for ax, what in zip(axes[0, :2], ("train accuracy (train mode)",
                                      "test accuracy (eval mode)"), strict=True):
        ax.set_xlabel("% of training")
        ax.set_ylabel(what)
        ax.set_ylim(0, 1.02)
    axes[0, 0].legend(fontsize=7, handlelength=3.5)
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
    ax.set_yticks(y, final["run"], fontsize=7)
    ax.set_xlim(0, 110)
    ax.set_xlabel("final test accuracy (%)")
    ax.set_title("E1: final accuracy, paper vs measured")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
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
