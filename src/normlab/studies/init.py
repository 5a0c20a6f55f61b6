"""The `init` study (R7): initialization scheme x norm kind x depth.

For each combination:
- the signal-propagation profile at initialization: per-channel mean and variance of every
  conv/linear output versus depth (train-mode BN, one batch of training images);
- the input-output Jacobian spectrum at initialization (input -> stage3 feature map);
- the largest stable learning rate of short constant-lr runs, and the test accuracy of those
  runs after the fixed budget.

The question it answers: does delta-orthogonal initialization (Xiao et al. 2018) let an
unnormalized ResNet take the learning rates BN allows? And the mean-field view (Schoenholz et
al. 2017): without normalization the forward signal's variance drifts geometrically with depth
unless the init sits at the order/chaos boundary (see docs/theory.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from normlab.runs.spec import RunSpec
from normlab.studies import figures as plot
from normlab.studies._findings import Finding, verdict
from normlab.studies._scales import ScaleConfig, default_data, pick_scale, resnet_spec
from normlab.studies._theory_tasks import JACOBIAN_TASK
from normlab.studies._trains import TRAINS_DEFINITION, TRAINS_MIN_TEST_ACC, stable_and_trained
from normlab.studies.base import Study, StudyResults, register_study

INITS = ("xavier_normal", "kaiming_normal", "orthogonal", "delta_orthogonal")


@dataclass(frozen=True)
class InitScale(ScaleConfig):
    """Per depth x norm x init: a profile run on `examples` images, and `lrs` runs of `steps`."""

    depths: tuple[int, ...]
    width: int
    norms: tuple[str, ...]
    lrs: tuple[float, ...]
    steps: int
    batch_size: int
    examples: int
    inits: tuple[str, ...] = INITS


SCALES = {
    # digits, ResNet-8/14 of width 8: a few minutes on 2 CPU cores
    "smoke": InitScale(depths=(8, 14), width=8, norms=("none", "batch"), lrs=(0.01, 0.1, 1.0),
                       steps=60, batch_size=64, examples=4),
    # CIFAR-10, one GPU
    "reduced": InitScale(depths=(20, 56), width=16, norms=("none", "batch", "group"),
                         lrs=tuple(float(v) for v in np.geomspace(1e-4, 3.0, 10)), steps=2000,
                         batch_size=128, examples=2),
    "paper": InitScale(depths=(20, 56, 110), width=16, norms=("none", "batch", "group", "layer"),
                       lrs=tuple(float(v) for v in np.geomspace(1e-5, 3.0, 12)), steps=8000,
                       batch_size=128, examples=2),
}


@register_study
class InitStudy(Study):
    name = "init"
    description = ("R7: init scheme x norm x depth: signal propagation and Jacobian spectrum at "
                   "initialization, largest stable lr and test accuracy after a fixed budget.")
    experiments = ("R7",)

    # -- the grid ---------------------------------------------------------------------------------
    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        s = pick_scale(SCALES, scale)
        data = default_data(scale, data)
        base = resnet_spec(data, width=s.width, batch_size=s.batch_size)
        specs = []
        for depth in s.depths:
            for norm in s.norms:
                for init in s.inits:
                    spec = base.replace(depth=depth, norm=norm, init=init)
                    specs.append(spec.replace(task=JACOBIAN_TASK, group="R7-profile",
                                              options={"examples": s.examples,
                                                       "layer": "stage3"}))
                    specs += [spec.replace(group="R7-train", lr=lr, steps=s.steps,
                                           log_every=s.steps) for lr in s.lrs]
        return specs

    # -- figures ----------------------------------------------------------------------------------
    def figures(self, results: StudyResults, fig_dir: Path) -> list[plot.FigureInfo]:
        return plot.draw_figures(results, fig_dir, _profile_figure, _jacobian_figure,
                            _stable_lr_figure, _accuracy_figure)

    # -- findings ---------------------------------------------------------------------------------
    def findings(self, results: StudyResults) -> list[Finding]:
        rows = []
        growth = _variance_growth(results)
        if not growth.empty:
            deepest = growth[growth["depth"] == growth["depth"].max()].set_index(["norm", "init"])
            values = deepest["growth"]
            keys = [("none", "kaiming_normal"), ("none", "xavier_normal"),
                    ("batch", "xavier_normal")]
            if all(k in values.index for k in keys):
                he, xavier, bn = (float(values[k]) for k in keys)
                rows.append(Finding(
                    "R7", "Without normalization the activation variance grows with depth at "
                    "initialization, more with He (Kaiming) than with Xavier init; BN keeps "
                    "it within a decade",
                    "He ~1e9, Xavier ~1e3 over 54 blocks of ResNet-110; BN ~1e-1...1e1",
                    f"median channel variance, last conv / first conv, ResNet-"
                    f"{int(deepest['depth'].iloc[0])}: He {he:.3g}, Xavier {xavier:.3g}, "
                    f"BN+Xavier {bn:.3g}",
                    verdict(bool(he > max(xavier, 1.0) and abs(math.log10(bn)) < 1))))
        stable = _stable_table(results)
        if not stable.empty:
            deepest = stable[stable["depth"] == stable["depth"].max()]
            table = deepest.set_index(["norm", "init"])["largest_trained_lr"]
            if ("none", "delta_orthogonal") in table.index and "batch" in deepest["norm"].values:
                delta = float(table[("none", "delta_orthogonal")])
                bn = float(deepest[deepest["norm"] == "batch"]["largest_trained_lr"].max())
                answer = ("yes" if delta >= bn else "no") if not (
                    math.isnan(delta) or math.isnan(bn)) else "undetermined"
                rows.append(Finding(
                    "R7", "Delta-orthogonal init lets an unnormalized ResNet train at the "
                    "learning rates BN allows",
                    "not in the paper (review R7)",
                    f"{answer}: largest lr that trains (no divergence, test accuracy >= "
                    f"{TRAINS_MIN_TEST_ACC:g}) at depth {int(deepest['depth'].iloc[0])}: "
                    f"no norm + delta-orthogonal {delta:.3g}, BN (best init) {bn:.3g}",
                    None))
        return rows


# -- measurements, as tables ---------------------------------------------------------------------

def _stable_table(results: StudyResults) -> pd.DataFrame:
    return stable_and_trained(results.in_group("R7-train"), ["depth", "norm", "init"])


def _profile_table(results: StudyResults) -> pd.DataFrame:
    records = results.records("activation_stats")
    if records.empty:
        return records
    # the record's `depth` (layer index) shadows the run's `depth` (network depth) in the join
    runs = results.runs.set_index("run_id")["depth"].rename("network_depth")
    records = records.join(runs, on="run_id")
    records = records[records["quantity"].isin(["mean", "variance"])].copy()
    records["value"] = records["value"].abs()
    return (records.groupby(["network_depth", "norm", "init", "quantity", "depth"],
                            as_index=False)["value"].median()
            .rename(columns={"depth": "layer_depth"}))


def _variance_growth(results: StudyResults) -> pd.DataFrame:
    """Median channel variance of the last conv over that of the first, per network."""
    table = _profile_table(results)
    if table.empty:
        return table
    var = table[table["quantity"] == "variance"]
    rows = []
    for (depth, norm, init), part in var.groupby(["network_depth", "norm", "init"]):
        part = part.sort_values("layer_depth")
        convs = part[part["layer_depth"] < part["layer_depth"].max()]  # without the classifier
        rows.append({"depth": depth, "norm": norm, "init": init,
                     "growth": float(convs["value"].iloc[-1] / convs["value"].iloc[0])})
    return pd.DataFrame(rows)


# -- figures --------------------------------------------------------------------------------------

@plot.figure("R7", "init_signal_propagation", "Signal propagation at initialization")
def _profile_figure(results: StudyResults) -> plot.Drawn:
    """Median over channels of the per-channel variance and |mean| of each conv/linear output
    (before its norm) at initialization, one batch of training images; BN mode: train (batch
    statistics)."""
    table = plot.require(_profile_table(results))
    keys = sorted(table.groupby(["network_depth", "norm"]).groups)
    fig, axes = plot.new_figure(2, len(keys))
    for col, (depth, norm) in enumerate(keys):
        for row, quantity in enumerate(("variance", "mean")):
            ax = axes[row][col]
            part = table[(table["network_depth"] == depth) & (table["norm"] == norm)
                         & (table["quantity"] == quantity)]
            plot.plot_series(ax, part.assign(value=part["value"].clip(lower=1e-30)), "layer_depth",
                        "value", "init")
            plot.label_axes(ax, "layer depth",
                       f"median channel {'variance' if row == 0 else '|mean|'}",
                       f"ResNet-{int(depth)}, norm {norm}", ylog=True)
    axes[0][0].legend()
    return fig, table


@plot.figure("R7", "init_jacobian", "Jacobian conditioning at initialization")
def _jacobian_figure(results: StudyResults) -> plot.Drawn:
    """Spread of the singular values of the Jacobian from the input batch to the stage3 feature map
    at initialization (Golub-Kahan-Lanczos on JVPs/VJPs, full spectrum); BN mode: train (batch
    statistics)."""
    runs = results.in_group("R7-profile")
    if runs.empty or "jac_max" not in runs:
        return None
    runs = runs[runs["status"] == "completed"]
    table = runs[["depth", "norm", "init", "jac_max", "jac_rms", "jac_condition",
                  "jac_tiny_share"]].copy()
    table["max_over_rms"] = table["jac_max"] / table["jac_rms"]
    norms = sorted(table["norm"].unique())
    fig, axes = plot.new_figure(1, 2)
    for ax, column, label in ((axes[0][0], "max_over_rms", "largest / rms singular value"),
                              (axes[0][1], "jac_tiny_share", "share of s < 0.1 rms")):
        for init, part in table.groupby("init"):
            for norm in norms:
                line = part[part["norm"] == norm].sort_values("depth")
                ax.plot(line["depth"], line[column], "o-" if norm == "none" else "s--",
                        color=plot.INIT_COLORS.get(init), label=f"{init}, {norm}")
        plot.label_axes(ax, "network depth", label)
    axes[0][0].set_yscale("log")
    axes[0][0].legend()
    return fig, table


@plot.figure("R7",
        "init_stable_lr",
        "Largest lr that trains, by init and norm",
        f"Largest learning rate of the grid whose short constant-lr SGD run "
        f"trains ({TRAINS_DEFINITION}); BN mode: train during the steps, eval for "
        "the test accuracy. '>=': the largest lr tried; a triangle: none of the "
        "grid.")
def _stable_lr_figure(results: StudyResults) -> plot.Drawn:
    table = plot.require(_stable_table(results))
    depths = sorted(table["depth"].unique())
    inits = [i for i in INITS if i in set(table["init"])]
    fig, axes = plot.new_figure(1, len(depths))
    used: set[str] = set()
    for ax, depth in zip(axes[0], depths, strict=True):
        used |= plot.grouped_bars(ax, table[table["depth"] == depth], "norm", "init", inits)
        plot.label_axes(ax, "", "largest lr that trains (constant schedule)",
                        f"ResNet-{int(depth)}")
    plot.marker_legend(axes[0][0], used)
    return fig, table


@plot.figure("R7", "init_accuracy", "Test accuracy after a fixed budget")
def _accuracy_figure(results: StudyResults) -> plot.Drawn:
    """Test accuracy after the fixed number of constant-lr SGD steps; BN mode: train for the steps,
    eval (running statistics) for the test set; missing points diverged."""
    runs = results.in_group("R7-train")
    if runs.empty or "test_acc" not in runs:
        return None
    table = runs[["depth", "norm", "init", "lr", "status", "test_acc"]].copy()
    keys = sorted(table.groupby(["depth", "norm"]).groups)
    fig, axes = plot.new_figure(1, len(keys))
    for ax, (depth, norm) in zip(axes[0], keys, strict=True):
        plot.plot_series(ax, table[(table["depth"] == depth) & (table["norm"] == norm)], "lr",
                    "test_acc", "init")
        ax.set_ylim(0, 1)
        plot.label_axes(ax, "learning rate", "test accuracy after the budget",
                   f"ResNet-{int(depth)}, norm {norm}", xlog=True)
    axes[0][0].legend()
    return fig, table
