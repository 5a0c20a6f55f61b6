"""The `small-batch` study (R1): do the alternatives to BN allow its learning rates, and do
they hold up at small batches, where BN's batch statistics become noisy?

BatchNorm, GroupNorm, LayerNorm, InstanceNorm and Batch Renormalization, each at batch sizes
from 2 to 128 and over a learning-rate grid, with a fixed budget in epochs (the same number of
examples seen at every batch size): the best test accuracy per (norm, batch size) and the
largest learning rate that trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from normlab.report import figures as plot
from normlab.spec import RunSpec
from normlab.studies._findings import Finding, verdict
from normlab.studies._scales import ScaleConfig, default_data, pick_scale, resnet_spec
from normlab.studies._trains import TRAINS_DEFINITION, stable_and_trained
from normlab.studies.base import Study, StudyResults, register_study

NORMS = ("batch", "group", "layer", "instance", "batch_renorm")


@dataclass(frozen=True)
class SmallBatchScale(ScaleConfig):
    depth: int
    width: int
    groups: int  # GroupNorm's groups
    batch_sizes: tuple[int, ...]
    lrs: tuple[float, ...]
    epochs: float
    norms: tuple[str, ...] = NORMS


SCALES = {
    # digits, ResNet-8 of width 8 (GroupNorm with 2 groups: 8 would be InstanceNorm)
    "smoke": SmallBatchScale(depth=8, width=8, groups=2, batch_sizes=(2, 8, 32, 128),
                             lrs=(0.01, 0.1, 1.0), epochs=1.0),
    # CIFAR-10, ResNet-20: one GPU
    "reduced": SmallBatchScale(depth=20, width=16, groups=4, batch_sizes=(2, 4, 8, 16, 32, 64, 128),
                               lrs=tuple(float(v) for v in np.geomspace(1e-3, 3.0, 8)),
                               epochs=30.0),
    "paper": SmallBatchScale(depth=110, width=16, groups=8, batch_sizes=(2, 4, 8, 16, 32, 64, 128),
                             lrs=tuple(float(v) for v in np.geomspace(1e-4, 3.0, 10)),
                             epochs=160.0),
}


@register_study
class SmallBatchStudy(Study):
    name = "small-batch"
    description = ("R1: BN, GroupNorm, LayerNorm, InstanceNorm and Batch Renormalization at "
                   "batch sizes 2..128: best test accuracy and the largest lr that trains.")
    experiments = ("R1",)

    # -- the grid ---------------------------------------------------------------------------------
    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        s = pick_scale(SCALES, scale)
        base = resnet_spec(default_data(scale, data), depth=s.depth, width=s.width,
                           epochs=s.epochs, group="R1", log_every=50)
        return [base.replace(norm=norm, batch_size=b, lr=lr,
                             norm_options={"groups": s.groups} if norm == "group" else {})
                for norm in s.norms for b in s.batch_sizes for lr in s.lrs]

    # -- figures ----------------------------------------------------------------------------------
    def figures(self, results: StudyResults, fig_dir: Path) -> list[plot.FigureInfo]:
        return plot.draw_figures(results, fig_dir, _accuracy_figure, _stable_lr_figure)

    # -- findings ---------------------------------------------------------------------------------
    def findings(self, results: StudyResults) -> list[Finding]:
        rows = []
        best = _best_accuracy(results)
        if not best.empty:
            smallest = best[best["batch_size"] == best["batch_size"].min()].set_index("norm")
            acc = smallest["test_acc"]
            if "batch" in acc and ({"group", "batch_renorm"} & set(acc.index)):
                rival = max(acc.get(n, -1.0) for n in ("group", "batch_renorm"))
                rows.append(Finding(
                    "R1", f"At the smallest batch ({int(smallest['batch_size'].iloc[0])}) "
                    "GroupNorm or Batch Renormalization beats BatchNorm",
                    "not in the paper (review R1; Wu & He 2018, Ioffe 2017)",
                    "best test accuracy over the lr grid: "
                    + ", ".join(f"{n} {a:.3f}" for n, a in acc.items()),
                    verdict(bool(rival > acc["batch"]))))
        table = _stable_table(results)
        if not table.empty:
            lrs = table.groupby("norm")["largest_trained_lr"].max()  # over batch sizes
            if "batch" in lrs and len(lrs) > 1:
                others = {n: v for n, v in lrs.items() if n != "batch"}
                rows.append(Finding(
                    "R1", "LayerNorm, GroupNorm, InstanceNorm and Batch Renormalization allow "
                    "learning rates as large as BN's",
                    "not in the paper (review R1)",
                    "largest lr that trains (at any batch size): "
                    + ", ".join(f"{n} {v:.3g}" for n, v in lrs.items()),
                    None if math.isnan(lrs["batch"]) else
                    verdict(all(v >= lrs["batch"] for v in others.values()))))
        return rows


# -- measurements, as tables ---------------------------------------------------------------------

def _stable_table(results: StudyResults) -> pd.DataFrame:
    return stable_and_trained(results.in_group("R1"), ["norm", "batch_size"])


def _best_accuracy(results: StudyResults) -> pd.DataFrame:
    """Best test accuracy over the lr grid per (norm, batch size), with the lr that got it."""
    runs = results.in_group("R1")
    if runs.empty or "test_acc" not in runs:
        return pd.DataFrame()
    done = runs[(runs["status"] == "completed") & runs["test_acc"].notna()]
    if done.empty:
        return pd.DataFrame()
    best = done.loc[done.groupby(["norm", "batch_size"])["test_acc"].idxmax()]
    return best[["norm", "batch_size", "lr", "test_acc"]].reset_index(drop=True)


# -- figures -------------------------------------------------------------------------------------

def _accuracy_figure(results: StudyResults, fig_dir: Path) -> plot.FigureInfo | None:
    table = plot.require(_best_accuracy(results))
    fig, axes = plot.new_figure()
    ax = axes[0][0]
    plot.plot_series(ax, table, "batch_size", "test_acc", "norm")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    plot.label_axes(ax, "batch size", "best test accuracy over the lr grid")
    ax.legend()
    return plot.saved_figure(
        fig, fig_dir, table, "R1", "small_batch_accuracy", "Accuracy versus batch size per norm",
        "Best test accuracy over the learning-rate grid after a fixed number of epochs of "
        "constant-lr SGD; BN mode: eval for the test set (BN and BatchRenorm use running "
        "statistics; the others have none), train for the steps.")


def _stable_lr_figure(results: StudyResults, fig_dir: Path) -> plot.FigureInfo | None:
    table = plot.require(_stable_table(results))
    fig = plot.largest_lr_figure(table, "batch_size", "batch size", log_base=2)
    return plot.saved_figure(
        fig, fig_dir, table, "R1", "small_batch_stable_lr",
        "Largest lr that trains versus batch size",
        f"Largest learning rate of the grid that trains ({TRAINS_DEFINITION}); BN mode: train "
        "during the steps, eval for the test accuracy. '>=': the largest lr tried; a triangle: "
        "none of the grid.")
