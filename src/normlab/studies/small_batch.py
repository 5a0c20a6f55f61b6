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

from normlab.spec import RunSpec
from normlab.studies._trainable_lr import largest_trainable_lr, log_y_if_positive
from normlab.studies.base import (
    FigureInfo,
    Finding,
    Study,
    StudyResults,
    default_data,
    register_study,
)

NORMS = ("batch", "group", "layer", "instance", "batch_renorm")
MIN_ACC = 0.2  # twice chance on 10 classes


@dataclass(frozen=True)
class _Scale:
    depth: int
    width: int
    groups: int
    batch_sizes: tuple[int, ...]
    lrs: tuple[float, ...]
    epochs: float


SCALES = {
    # digits, ResNet-8 of width 8 (GroupNorm with 2 groups: 8 would be InstanceNorm)
    "smoke": _Scale(8, 8, 2, (2, 8, 32, 128), (0.01, 0.1, 1.0), 1.0),
    # CIFAR-10, ResNet-20: one GPU
    "reduced": _Scale(20, 16, 4, (2, 4, 8, 16, 32, 64, 128),
                      tuple(float(v) for v in np.geomspace(1e-3, 3.0, 8)), 30.0),
    "paper": _Scale(110, 16, 8, (2, 4, 8, 16, 32, 64, 128),
                    tuple(float(v) for v in np.geomspace(1e-4, 3.0, 10)), 160.0),
}


@register_study
class SmallBatchStudy(Study):
    name = "small-batch"
    description = ("R1: BN, GroupNorm, LayerNorm, InstanceNorm and Batch Renormalization at "
                   "batch sizes 2..128: best test accuracy and the largest lr that trains.")
    experiments = ("R1",)

    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        data = default_data(scale, data)
        s = SCALES[scale]
        base = RunSpec(data=data, model="resnet", depth=s.depth, width=s.width,
                       init="xavier_normal", schedule="constant", momentum=0.9,
                       weight_decay=5e-4, epochs=s.epochs, group="R1", log_every=50)
        return [base.replace(norm=norm, batch_size=b, lr=lr,
                             norm_options={"groups": s.groups} if norm == "group" else {})
                for norm in NORMS for b in s.batch_sizes for lr in s.lrs]

    def figures(self, results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
        out = [_accuracy_figure(results, fig_dir), _stable_lr_figure(results, fig_dir)]
        return [f for f in out if f is not None]

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
                    bool(rival > acc["batch"])))
        table = largest_trainable_lr(results.in_group("R1"), ["norm", "batch_size"], MIN_ACC)
        if not table.empty:
            lrs = table.groupby("norm")["largest_stable_lr"].max()  # over batch sizes
            if "batch" in lrs and len(lrs) > 1:
                others = {n: v for n, v in lrs.items() if n != "batch"}
                rows.append(Finding(
                    "R1", "LayerNorm, GroupNorm, InstanceNorm and Batch Renormalization allow "
                    "learning rates as large as BN's",
                    "not in the paper (review R1)",
                    "largest lr that trains (at any batch size): "
                    + ", ".join(f"{n} {v:.3g}" for n, v in lrs.items()),
                    None if math.isnan(lrs["batch"]) else
                    all(v >= lrs["batch"] for v in others.values())))
        return rows


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


def _accuracy_figure(results: StudyResults, fig_dir: Path) -> FigureInfo | None:
    from normlab.report.figures import NORM_COLORS, new_figure, save_figure

    table = _best_accuracy(results)
    if table.empty:
        return None
    fig, axes = new_figure(1, 1, width=4.6)
    ax = axes[0][0]
    for norm, part in table.groupby("norm"):
        part = part.sort_values("batch_size")
        ax.plot(part["batch_size"], part["test_acc"], "o-", color=NORM_COLORS.get(norm),
                label=norm)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("batch size")
    ax.set_ylabel("best test accuracy over the lr grid")
    ax.legend(fontsize=7)
    files = save_figure(fig, fig_dir, "small_batch_accuracy", table)
    return FigureInfo("R1", "small_batch_accuracy", "Accuracy versus batch size per norm",
                      "Best test accuracy over the learning-rate grid after a fixed number of "
                      "epochs of constant-lr SGD; BN mode: eval for the test set (BN and "
                      "BatchRenorm use running statistics; the others have none), train for "
                      "the steps.",
                      files)


def _stable_lr_figure(results: StudyResults, fig_dir: Path) -> FigureInfo | None:
    from normlab.report.figures import NORM_COLORS, new_figure, save_figure

    table = largest_trainable_lr(results.in_group("R1"), ["norm", "batch_size"], MIN_ACC)
    if table.empty:
        return None
    fig, axes = new_figure(1, 1, width=4.6)
    ax = axes[0][0]
    for norm, part in table.groupby("norm"):
        part = part.sort_values("batch_size")
        ax.plot(part["batch_size"], part["largest_stable_lr"], "o-",
                color=NORM_COLORS.get(norm), label=norm)
    ax.set_xscale("log", base=2)
    log_y_if_positive(ax, table["largest_stable_lr"])
    ax.set_xlabel("batch size")
    ax.set_ylabel("largest lr that trains")
    ax.legend(fontsize=7)
    files = save_figure(fig, fig_dir, "small_batch_stable_lr", table)
    return FigureInfo("R1", "small_batch_stable_lr", "Largest lr that trains versus batch size",
                      "Largest learning rate of the grid whose constant-lr run neither diverged "
                      f"(mini-batch loss > diverge_loss; BN mode: train) nor ended below "
                      f"{MIN_ACC:g} test accuracy (BN mode: eval).", files)
