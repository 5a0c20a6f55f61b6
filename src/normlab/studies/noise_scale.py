"""The `noise-scale` study (E2, R5): SGD noise and Smith & Le's noise scale.

- E2: per-example gradients at initialization of N training examples; the SGD noise
  E||g_B - g||^2 estimated by drawing batches without replacement, against the exact formula
  (N - b) / (b (N - 1)) C_hat (eq. 2, derived in docs/theory.md), for b from 1 to N/2.
- R5: a learning rate x batch size grid of constant-lr SGD runs with a fixed budget in epochs.
  Test accuracy and the largest learning rate that trains, plotted against the noise scale
  g = lr N / (B (1 - m)): if the linear scaling rule holds, the best runs of every batch size
  sit at the same g; where it breaks, they do not (and stability, set by curvature, does not
  scale with B at all).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from normlab.data import load
from normlab.runs.spec import RunSpec
from normlab.studies._findings import Finding, verdict
from normlab.studies._scales import ScaleConfig, default_data, pick_scale, resnet_spec
from normlab.studies._theory_tasks import NOISE_TASK
from normlab.studies._trains import TRAINS_DEFINITION, stable_and_trained
from normlab.studies.base import Study, StudyResults, register_study
from normlab.studies.figures import (
    NORM_COLORS,
    Drawn,
    FigureInfo,
    draw_figures,
    figure,
    label_axes,
    largest_lr_figure,
    new_figure,
    plot_series,
    require,
)


@dataclass(frozen=True)
class NoiseScale(ScaleConfig):
    """E2: `noise_examples` examples per `noise_norms` net, `noise_samples` batches per size in
    `noise_batches`. R5: `norms` x `batch_sizes` x `lrs`, `epochs` each."""

    depth: int
    width: int
    noise_norms: tuple[str, ...]
    noise_examples: int
    noise_batches: tuple[int, ...]
    noise_samples: int
    norms: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    lrs: tuple[float, ...]
    epochs: float


SCALES = {
    # digits, ResNet-8 of width 8: about a minute on 2 CPU cores
    "smoke": NoiseScale(depth=8, width=8, noise_norms=("none",), noise_examples=128,
                        noise_batches=(1, 2, 4, 8, 16, 32, 64), noise_samples=200,
                        norms=("batch",), batch_sizes=(16, 64, 256),
                        lrs=(0.01, 0.04, 0.16, 0.64, 2.56), epochs=3.0),
    # CIFAR-10, ResNet-20: one GPU
    "reduced": NoiseScale(depth=20, width=16, noise_norms=("none", "group"),
                          noise_examples=1024, noise_batches=(1, 4, 16, 64, 256, 512),
                          noise_samples=400, norms=("batch", "none"),
                          batch_sizes=(32, 128, 512, 2048),
                          lrs=tuple(float(v) for v in np.geomspace(1e-3, 3.0, 8)), epochs=30.0),
    "paper": NoiseScale(depth=110, width=16, noise_norms=("none", "group"), noise_examples=2048,
                        noise_batches=(1, 4, 16, 64, 256, 1024), noise_samples=400,
                        norms=("batch", "none"), batch_sizes=(32, 128, 512, 2048),
                        lrs=tuple(float(v) for v in np.geomspace(1e-4, 3.0, 10)), epochs=160.0),
}


@register_study
class NoiseScaleStudy(Study):
    name = "noise-scale"
    description = ("E2, R5: SGD noise vs batch size against the exact without-replacement "
                   "formula, and an lr x batch-size grid read against the noise scale "
                   "g = lr N / (B (1 - m)).")
    experiments = ("E2", "R5")

    # -- the grid ---------------------------------------------------------------------------------
    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        s = pick_scale(SCALES, scale)
        data = default_data(scale, data)
        base = resnet_spec(data, depth=s.depth, width=s.width)
        specs = [base.replace(task=NOISE_TASK, group="E2", norm=norm,
                              options={"examples": s.noise_examples,
                                       "batch_sizes": list(s.noise_batches),
                                       "samples": s.noise_samples})
                 for norm in s.noise_norms]
        specs += [base.replace(group="R5", norm=norm, batch_size=b, lr=lr, epochs=s.epochs,
                               log_every=50)
                  for norm in s.norms for b in s.batch_sizes for lr in s.lrs]
        return specs

    # -- figures ----------------------------------------------------------------------------------
    def figures(self, results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
        return draw_figures(results, fig_dir, _noise_figure, _accuracy_figure,
                            _stable_lr_figure)

    # -- findings ---------------------------------------------------------------------------------
    def findings(self, results: StudyResults) -> list[Finding]:
        rows = []
        noise = _noise_table(results)
        if not noise.empty:
            z = (noise["noise_estimate"] - noise["noise_exact"]) / noise["stderr"]
            worst = noise.loc[z.abs().idxmax()]
            sizes = ", ".join(str(int(b)) for b in sorted(set(noise["batch_size"])))
            rows.append(Finding(
                "E2", "E||g_B - g||^2 = (N-b)/(b(N-1)) C_hat for batches drawn without "
                "replacement (eq. 2)", "derived (appendix proof)",
                f"Monte-Carlo vs formula over b = {sizes}"
                f" (N = {int(noise['examples'].iloc[0])}): largest deviation "
                f"{abs(worst['noise_estimate'] / worst['noise_exact'] - 1):.1%} at b = "
                f"{int(worst['batch_size'])} ({abs(z).max():.1f} standard errors)",
                *verdict(bool(z.abs().max() < 4),
                         "every Monte-Carlo estimate within 4 standard errors of the formula")))
        grid = _grid(results)
        if not grid.empty:
            for norm, part in grid.groupby("norm"):
                best = part.loc[part.groupby("batch_size")["test_acc"].idxmax()]
                if len(best) < 2:
                    continue
                lr_spread = best["lr"].max() / best["lr"].min()
                g_spread = best["noise_scale"].max() / best["noise_scale"].min()
                rows.append(Finding(
                    "R5", f"Linear scaling rule (norm {norm}): the best runs of every batch "
                    "size share one noise scale g = lr N / (B(1-m))",
                    "Smith & Le 2018 (not measured in the paper)",
                    "best lr per batch size " + ", ".join(
                        f"B={int(r.batch_size)}: {r.lr:g} (g={r.noise_scale:.3g})"
                        for r in best.itertuples())
                    + f"; spread of best g {g_spread:.3g}x vs of best lr {lr_spread:.3g}x",
                    *verdict(bool(g_spread < lr_spread),
                             "the best runs' noise scales spread less than their lrs")))
        return rows


# -- measurements, as tables ---------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _train_size(data: str) -> int:
    return len(load(data)[0])


def _noise_table(results: StudyResults) -> pd.DataFrame:
    records = results.records("sgd_noise")
    if records.empty:
        return records
    wide = records.pivot_table(index=["norm", "batch_size", "examples"], columns="quantity",
                               values="value").reset_index()
    stderr = (records[records["quantity"] == "noise_estimate"]
              .groupby(["norm", "batch_size"])["stderr"].first().rename("stderr"))
    return wide.join(stderr, on=["norm", "batch_size"])


def _grid(results: StudyResults) -> pd.DataFrame:
    runs = results.runs
    if runs.empty or "group" not in runs:
        return pd.DataFrame()
    runs = runs[runs["group"] == "R5"].copy()
    if runs.empty:
        return runs
    if "test_acc" not in runs:
        runs["test_acc"] = np.nan
    runs["examples"] = [_train_size(d) for d in runs["data"]]
    runs["noise_scale"] = runs["lr"] * runs["examples"] / (runs["batch_size"]
                                                           * (1 - runs["momentum"]))
    # a diverged run reached no accuracy; plot it at chance level's floor (0)
    runs.loc[runs["status"] == "diverged", "test_acc"] = 0.0
    return runs


# -- figures --------------------------------------------------------------------------------------

@figure("E2", "sgd_noise_vs_batch", "SGD noise versus batch size")
def _noise_figure(results: StudyResults) -> Drawn:
    """Squared distance between the mini-batch gradient and the full gradient over N training
    examples at initialization, averaged over batches drawn without replacement, against eq. 2;
    per-example loss gradients (per_example_loss_grads), models without batch coupling, so BN
    mode does not apply."""
    table = require(_noise_table(results))
    fig, axes = new_figure()
    ax = axes[0][0]
    for norm, part in table.groupby("norm"):
        part = part.sort_values("batch_size")
        color = NORM_COLORS.get(norm)
        ax.errorbar(part["batch_size"], part["noise_estimate"], yerr=2 * part["stderr"],
                    fmt="o", color=color, label=f"{norm}: sampled batches (+-2 se)")
        ax.plot(part["batch_size"], part["noise_exact"], "-", color=color,
                label=f"{norm}: (N-b)/(b(N-1)) C_hat")
        ax.plot(part["batch_size"], part["noise_bound"], ":", color=color,
                label=f"{norm}: bound C_hat / b")
    label_axes(ax, "batch size b", "E ||g_B - g||^2", xlog=True, ylog=True)
    ax.legend()
    return fig, table


@figure("R5", "accuracy_vs_noise_scale", "Accuracy against lr and noise scale")
def _accuracy_figure(results: StudyResults) -> Drawn:
    """Test accuracy (BN mode: eval, running statistics) after a fixed number of epochs of
    constant-lr SGD, against the learning rate (left) and Smith & Le's noise scale g = lr N /
    (B(1-m)) (right); diverged runs at 0. Curves that collapse on the right obey the linear
    scaling rule."""
    grid = require(_grid(results))
    norms = sorted(grid["norm"].unique())
    fig, axes = new_figure(len(norms), 2)
    for row, norm in enumerate(norms):
        part = grid[grid["norm"] == norm]
        for ax, x, label in zip(axes[row], ("lr", "noise_scale"),
                                ("learning rate", "noise scale g = lr N / (B(1-m))"),
                                strict=True):
            plot_series(ax, part, x, "test_acc", "batch_size", label="B={}")
            ax.set_ylim(0, 1)
            label_axes(ax, label, "test accuracy", f"norm {norm}", xlog=True)
    axes[0][0].legend()
    data = grid[["norm", "batch_size", "lr", "momentum", "examples", "noise_scale", "status",
                 "test_acc"]]
    return fig, data


@figure("R5",
        "stable_lr_vs_batch",
        "Largest lr that trains versus batch size",
        f"Largest learning rate of the grid that trains ({TRAINS_DEFINITION}), per "
        "batch size (BN mode: train during the steps), against the linear scaling "
        "line. '>=': the largest lr tried; a triangle: none of the grid.")
def _stable_lr_figure(results: StudyResults) -> Drawn:
    grid = require(_grid(results))
    table = stable_and_trained(grid, ["norm", "batch_size"])

    def scaling_lines(ax) -> None:  # lr proportional to B from the smallest batch that trains
        for norm, part in table.groupby("norm"):
            first = part.sort_values("batch_size").dropna(subset=["largest_trained_lr"]).head(1)
            if not first.empty:
                b0 = float(first["batch_size"].iloc[0])
                lr0 = float(first["largest_trained_lr"].iloc[0])
                ax.plot(part["batch_size"], lr0 * part["batch_size"] / b0, ":",
                        color=NORM_COLORS.get(norm), label=f"{norm}: lr proportional to B")

    fig = largest_lr_figure(table, "batch_size", "batch size B", extra=scaling_lines)
    return fig, table
