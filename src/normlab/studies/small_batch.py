"""The `small-batch` study (R1): do the alternatives to BN allow its learning rates, and do
they hold up at small batches, where BN's batch statistics become noisy?

BatchNorm, GroupNorm, LayerNorm, InstanceNorm and Batch Renormalization, each at batch sizes
from 2 to 128 and over a learning-rate grid, with a fixed budget in epochs (the same number of
examples seen at every batch size): the best test accuracy per (norm, batch size), the largest
learning rate that trains, and each curve's divergence frontier as a bracket (`studies._trains`;
the points near a frontier get `replicates` perturbation replicates per seed, `studies._frontier`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from normlab.runs.spec import RunSpec
from normlab.studies import figures as plot
from normlab.studies._findings import AGREES, DIFFERS, NOT_TESTABLE, Finding, verdict
from normlab.studies._frontier import (
    REPLICATES,
    follow_up_note,
    frontier_replicates,
    replicates_setting,
    status_series,
)
from normlab.studies._options import Option
from normlab.studies._scales import ScaleConfig, default_data, pick_scale, resnet_spec
from normlab.studies._trains import (
    TRAINS_DEFINITION,
    bracket_text,
    frontier_order,
    lr_text,
    same_cell,
    stable_and_trained,
)
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
    replicates: int = 2  # perturbation replicates per seed of each point near a frontier


SCALES = {
    # digits, ResNet-8 of width 8 (GroupNorm with 2 groups: 8 would be InstanceNorm)
    "smoke": SmallBatchScale(depth=8, width=8, groups=2, batch_sizes=(2, 8, 32, 128),
                             lrs=(0.01, 0.1, 1.0), epochs=1.0, replicates=2),
    # CIFAR-10, ResNet-20: one GPU
    "reduced": SmallBatchScale(depth=20, width=16, groups=4, batch_sizes=(2, 4, 8, 16, 32, 64, 128),
                               lrs=tuple(float(v) for v in np.geomspace(1e-3, 3.0, 8)),
                               epochs=30.0, replicates=2),
    "paper": SmallBatchScale(depth=110, width=16, groups=8, batch_sizes=(2, 4, 8, 16, 32, 64, 128),
                             lrs=tuple(float(v) for v in np.geomspace(1e-4, 3.0, 10)),
                             epochs=160.0, replicates=1),
}


@register_study
class SmallBatchStudy(Study):
    name = "small-batch"
    description = ("R1: BN, GroupNorm, LayerNorm, InstanceNorm and Batch Renormalization at "
                   "batch sizes 2..128: best test accuracy and the largest lr that trains.")
    experiments = ("R1",)
    settings: ClassVar[Mapping[str, Option]] = REPLICATES

    # -- the grid ---------------------------------------------------------------------------------
    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        s = pick_scale(SCALES, scale)
        base = resnet_spec(default_data(scale, data), depth=s.depth, width=s.width,
                           epochs=s.epochs, group="R1", log_every=50)
        return [base.replace(norm=norm, batch_size=b, lr=lr,
                             norm_options={"groups": s.groups} if norm == "group" else {})
                for norm in s.norms for b in s.batch_sizes for lr in s.lrs]

    def follow_ups(self, planned: Sequence[RunSpec], results: StudyResults, scale: str,
                   settings: Mapping[str, Any]) -> list[RunSpec]:
        """Perturbation replicates of the points near each (norm, batch size) frontier."""
        return frontier_replicates(planned, status_series(results.runs), ("norm", "batch_size"),
                                   self._replicates(scale, settings),
                                   lambda spec: spec.group == "R1")

    def follow_up_note(self, scale: str, settings: Mapping[str, Any]) -> str:
        return follow_up_note(self._replicates(scale, settings), "per norm and batch size")

    @staticmethod
    def _replicates(scale: str, settings: Mapping[str, Any]) -> int:
        return replicates_setting(settings, pick_scale(SCALES, scale).replicates)

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
                    *verdict(bool(rival > acc["batch"]),
                             "the better of GroupNorm and Batch Renormalization > BN")))
        table = _stable_table(results)
        if not table.empty and "batch" in set(table["norm"]) and table["norm"].nunique() > 1:
            claim = ("LayerNorm, GroupNorm, InstanceNorm and Batch Renormalization allow "
                     "learning rates as large as BN's")
            rows.append(Finding(
                "R1", f"{claim} (largest lr that trains)", "not in the paper (review R1)",
                "largest lr that trains per batch size: " + _per_batch(table, _trained),
                *_trains_as_large_as_bn(table)))
            rows.append(Finding(
                "R1", f"{claim} (the paper's divergence criterion)",
                "not in the paper (review R1)",
                "frontier brackets per batch size: " + _per_batch(table, bracket_text),
                *_as_large_as_bn(table)))
        return rows


def _per_batch(table: pd.DataFrame, text: Callable[[pd.Series], str]) -> str:
    """E.g. "2: batch [0.1, 1], group [1, > 1]; 8: ..." (`text` of each norm's row)."""
    return "; ".join(f"{int(b)}: " + ", ".join(f"{r['norm']} {text(r)}"
                                               for _, r in part.iterrows())
                     for b, part in table.groupby("batch_size"))


def _trained(row: pd.Series) -> str:
    return lr_text(row["largest_trained_lr"], bool(row["trained_censored"]))


def _trains_as_large_as_bn(table: pd.DataFrame) -> tuple[str, str]:
    """The verdict on "the alternatives allow BN's learning rates" by "trains": "differs" when
    at some batch size an alternative's largest lr that trains lies below BN's (or it trains at
    no lr of the grid while BN does), "agrees" when each is at least BN's everywhere, else not
    testable (neither trains at any lr of the grid, or both at its largest)."""
    below, open_ = [], []
    for batch, part in table.groupby("batch_size"):
        rows = part.set_index("norm")
        if "batch" not in rows.index:
            continue
        bn = rows.loc["batch", "largest_trained_lr"]
        for norm, row in rows.drop(index="batch").iterrows():
            lr = row["largest_trained_lr"]
            if np.isnan(lr) and np.isnan(bn):
                open_.append(f"neither {norm} nor BN trains at any lr of the grid at batch "
                             f"{int(batch)}")
            elif bool(row["trained_censored"]) and bool(rows.loc["batch", "trained_censored"]):
                open_.append(f"{norm} and BN both train at the grid's largest lr at batch "
                             f"{int(batch)}")
            elif np.isnan(lr) or lr < bn:
                below.append(f"{norm} {_trained(row)} vs BN {_trained(rows.loc['batch'])} at "
                             f"batch {int(batch)}")
    if below:
        return DIFFERS, "below BN's largest lr that trains: " + "; ".join(below)
    if open_:
        return NOT_TESTABLE, "the grid does not reach the limits: " + "; ".join(open_)
    return AGREES, "at every batch size each largest lr that trains is at least BN's"


def _as_large_as_bn(table: pd.DataFrame) -> tuple[str, str]:
    """The verdict on "the alternatives allow BN's learning rates", read off the frontier
    brackets at each batch size: "differs" when one lies below BN's, "agrees" when each lies at
    or above BN's or in the same grid step, else not testable (the brackets overlap)."""
    below, open_ = [], []
    for batch, part in table.groupby("batch_size"):
        rows = part.set_index("norm")
        if "batch" not in rows.index:
            continue
        bn = rows.loc["batch"]
        for norm, row in rows.drop(index="batch").iterrows():
            order = frontier_order(row, bn)
            if order < 0:
                below.append(f"{norm} at batch {int(batch)}")
            elif order == 0 and not same_cell(row, bn):
                open_.append(f"{norm} {bracket_text(row)} vs BN {bracket_text(bn)} at batch "
                             f"{int(batch)}")
    if below:
        return DIFFERS, "below BN's frontier: " + ", ".join(below)
    if open_:
        return NOT_TESTABLE, ("the frontier brackets overlap, so the grid cannot order the "
                              "frontiers: " + "; ".join(open_))
    return AGREES, ("at every batch size each bracket lies at or above BN's, or in the same "
                    "grid step")


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

@plot.figure("R1", "small_batch_accuracy", "Accuracy versus batch size per norm")
def _accuracy_figure(results: StudyResults) -> plot.Drawn:
    """Best test accuracy over the learning-rate grid after a fixed number of epochs of constant-lr
    SGD; BN mode: eval for the test set (BN and BatchRenorm use running statistics; the others
    have none), train for the steps."""
    table = plot.require(_best_accuracy(results))
    fig, axes = plot.new_figure()
    ax = axes[0][0]
    plot.plot_series(ax, table, "batch_size", "test_acc", "norm")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    plot.label_axes(ax, "batch size", "best test accuracy over the lr grid")
    plot.marker_legend(ax, [])  # names any norm whose line coincides with another's
    return fig, table


@plot.figure("R1",
             "small_batch_stable_lr",
             "Largest lr that trains versus batch size",
             f"Largest learning rate of the grid that trains ({TRAINS_DEFINITION}); BN mode: "
             "train during the steps, eval for the test accuracy. '>=': the largest lr tried; a "
             "triangle: none of the grid.")
def _stable_lr_figure(results: StudyResults) -> plot.Drawn:
    table = plot.require(_stable_table(results))
    fig = plot.largest_lr_figure(table, "batch_size", "batch size", log_base=2)
    return fig, table
