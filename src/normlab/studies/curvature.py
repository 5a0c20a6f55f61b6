"""The `curvature` study (R8, R9, edge of stability): how sharp is what each regime finds?

- R9: lambda_max of the training loss (train-mode BN, fixed batches) at the end of training for
  each (norm, lr) of an lr-sweep-like grid, and lambda_max over training (the "sharpness"
  callback on a fixed batch) against the stability thresholds 2/lr and 2(1+momentum)/lr;
- R8: Leslie Smith's LR range test per norm at initialization, beside the largest stable lr
  read off the same grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from normlab.probes import hessian_eigs, lr_range_test
from normlab.probes._batches import fixed_batches
from normlab.runs.result import RunResult, provenance
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext, register_task
from normlab.studies._findings import Finding, verdict
from normlab.studies._options import Option, declare_options, read_options
from normlab.studies._scales import TrainScale, default_data, pick_scale, resnet_spec
from normlab.studies._trains import TRAINS_DEFINITION, stable_and_trained, trains
from normlab.studies.base import Study, StudyResults, register_study
from normlab.studies.figures import (
    DIVERGED,
    NORM_COLORS,
    Drawn,
    FigureInfo,
    diverged_strip,
    draw_figures,
    figure,
    label_axes,
    marker_legend,
    new_figure,
    require,
)
from normlab.train import train
from normlab.train.build import build_data, build_model, resolve_device
from normlab.train.callbacks import TrainState

SHARPNESS_TASK = "curvature-probes"
RANGE_TASK = "lr-range"


@dataclass(frozen=True)
class CurvatureScale(TrainScale):
    """R9: `norms` x `lrs` runs of `steps` (sharpness every `every` steps, lambda_max at the end on
    `hessian_batches` batches). R8: one range test of `range_steps` per norm."""

    every: int
    hessian_batches: int
    range_steps: int


SCALES = {
    # digits, ResNet-8 of width 8: a few minutes on 2 CPU cores
    "smoke": CurvatureScale(depth=8, width=8, batch_size=64, steps=60, norms=("none", "batch"),
                            lrs=(0.003, 0.03, 0.3, 3.0), every=20, hessian_batches=2,
                            range_steps=100),
    # CIFAR-10, ResNet-20: one GPU, hours
    "reduced": CurvatureScale(depth=20, width=16, batch_size=128, steps=6000,
                              norms=("none", "batch", "group", "layer"),
                              lrs=tuple(float(v) for v in np.geomspace(1e-4, 3, 10)), every=200,
                              hessian_batches=4, range_steps=300),
    # the paper's ResNet-110
    "paper": CurvatureScale(depth=110, width=16, batch_size=128, steps=40000,
                            norms=("none", "batch", "group", "layer", "batch_renorm"),
                            lrs=tuple(float(v) for v in np.geomspace(1e-5, 3, 12)), every=500,
                            hessian_batches=8, range_steps=500),
}

_POSITIVE_FLOAT = {"kind": "float", "low": 0.0, "low_open": True}
declare_options(SHARPNESS_TASK, hessian_batches=Option(2, low=1),
                tol=Option(1e-3, **_POSITIVE_FLOAT), max_iter=Option(50, low=1))
declare_options(RANGE_TASK, start=Option(1e-5, **_POSITIVE_FLOAT),
                end=Option(10.0, **_POSITIVE_FLOAT), range_steps=Option(100, low=1),
                smoothing=Option(0.98, **_POSITIVE_FLOAT),
                diverge_factor=Option(4.0, **_POSITIVE_FLOAT))


class _FinalSharpness:
    """A train callback: lambda_max on fixed batches at the last step."""

    def __init__(self, spec: RunSpec, options: dict[str, Any]) -> None:
        self.spec, self.options = spec, options
        self.summary: dict[str, float] = {}

    def __call__(self, state: TrainState) -> None:
        if state.step != state.total_steps:
            return
        batches = fixed_batches(state.train_data, self.spec.batch_size,
                                self.options["hessian_batches"], seed=self.spec.seed)
        eigs = hessian_eigs(state.model, state.loss_fn, batches, tol=self.options["tol"],
                            max_iter=self.options["max_iter"])
        state.context.log_records("final_sharpness", eigs.records(), step=state.step,
                                  batches=len(batches))
        self.summary.update(lambda_max=eigs.values[0], lambda_max_hvps=eigs.hvps)


@register_task(SHARPNESS_TASK)
def curvature_probes_task(spec: RunSpec, context: RunContext) -> RunResult:
    """Train the spec (its probes included) and take lambda_max on fixed batches at the end
    (options: hessian_batches, tol, max_iter)."""
    measure = _FinalSharpness(spec, read_options(spec))
    result = train(spec.replace(task="train", options={}), callbacks=[measure], context=context)
    result.final.update(measure.summary)
    return result


@register_task(RANGE_TASK)
def lr_range_task(spec: RunSpec, context: RunContext) -> RunResult:
    """Smith's LR range test on the spec's freshly initialized model and training batches
    (train-mode BN, the spec's momentum and weight decay; options: start, end, range_steps,
    smoothing, diverge_factor)."""
    import torch

    options = read_options(spec)
    device = resolve_device(spec.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        train_set, _, batches = build_data(spec, device)
        model = build_model(spec, train_set, device).train()
        result = lr_range_test(model, torch.nn.CrossEntropyLoss(), batches,
                               start=options["start"], end=options["end"],
                               steps=options["range_steps"], smoothing=options["smoothing"],
                               diverge_factor=options["diverge_factor"],
                               momentum=spec.momentum, weight_decay=spec.weight_decay)
    context.log_records("lr_range", result.records())
    final = {"lr_at_min": result.lr_at_min, "lr_steepest": result.lr_steepest,
             "suggested_lr": result.suggested_lr, "range_diverged_lr": result.diverged_lr}
    return RunResult(status="completed", steps=len(result.lrs), final=final,
                     provenance=provenance(spec.run_id, str(device), spec.seed))


@register_study
class CurvatureStudy(Study):
    name = "curvature"
    description = ("R8, R9: lambda_max at the end of training per (norm, lr), lambda_max over "
                   "training against 2/lr and 2(1+momentum)/lr, and the LR range test per norm "
                   "beside the largest stable lr.")
    experiments = ("R8", "R9")

    # -- the grid ---------------------------------------------------------------------------------
    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        s = pick_scale(SCALES, scale)
        data = default_data(scale, data)
        base = resnet_spec(data, depth=s.depth, width=s.width, batch_size=s.batch_size)
        specs = [base.replace(task=SHARPNESS_TASK, group="R9", norm=norm, lr=lr, steps=s.steps,
                              probes=[{"name": "sharpness", "every": s.every, "batch": "first"}],
                              options={"hessian_batches": s.hessian_batches})
                 for norm in s.norms for lr in s.lrs]
        specs += [base.replace(task=RANGE_TASK, group="R8", norm=norm, lr=max(s.lrs),
                               options={"range_steps": s.range_steps})
                  for norm in s.norms]
        return specs

    # -- figures ----------------------------------------------------------------------------------
    def figures(self, results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
        return draw_figures(results, fig_dir, _final_sharpness, _sharpness_over_training,
                            _range_figure)

    # -- findings ---------------------------------------------------------------------------------
    def findings(self, results: StudyResults) -> list[Finding]:
        rows = []
        runs = results.in_group("R9")
        if not runs.empty and "lambda_max" in runs:
            done = runs[trains(runs) & runs["lambda_max"].notna()]  # dead nets are trivially flat
            for norm, part in done.groupby("norm"):
                if part["lr"].nunique() < 2:
                    continue
                low, high = part.loc[part["lr"].idxmin()], part.loc[part["lr"].idxmax()]
                rows.append(Finding(
                    "R9", f"{norm}: larger learning rates end in flatter regions (smaller "
                    "lambda_max), as the edge of stability lambda_max ~ 2(1+m)/lr predicts "
                    "(runs that train only).",
                    "review's request (not in the paper)",
                    f"lambda_max {low['lambda_max']:.3g} at lr {low['lr']:g} vs "
                    f"{high['lambda_max']:.3g} at lr {high['lr']:g}",
                    verdict(bool(high["lambda_max"] < low["lambda_max"]))))
        ranges = results.in_group("R8")
        stable = _stable_table(results).set_index("norm") if not runs.empty else None
        if not ranges.empty and stable is not None and "lr_at_min" in ranges:
            for _, run in ranges.iterrows():
                edge = stable["largest_trained_lr"].get(run["norm"], math.nan)
                rows.append(Finding(
                    "R8", f"{run['norm']}: the LR range test locates the largest usable lr.",
                    "Smith: the lr where the loss stops improving bounds the usable range",
                    f"range test lr at min loss {run['lr_at_min']:.3g}; largest lr of the "
                    f"sweep that trained without diverging {edge:.3g}",
                    None if math.isnan(edge) else verdict(bool(edge / 10 <= run["lr_at_min"]
                                                               <= edge * 10))))
        return rows


# -- measurements, as tables ---------------------------------------------------------------------

def _stable_table(results: StudyResults) -> pd.DataFrame:
    runs = results.in_group("R9")
    if runs.empty:
        return pd.DataFrame(columns=["norm", "largest_stable_lr", "largest_trained_lr"])
    return stable_and_trained(runs, ["norm"])


# -- figures --------------------------------------------------------------------------------------

@figure("R9", "sharpness_vs_lr", "Sharpness of what each learning rate finds")
def _final_sharpness(results: StudyResults) -> Drawn:
    """Top Hessian eigenvalue of the mean training loss on fixed batches (train-mode BN: batch
    statistics are part of the function; Lanczos, 1e-3 relative) at the end of constant-lr
    training, against the stability thresholds 2/lr and 2(1+momentum)/lr; x in the strip above
    the panel: diverged runs (no lambda_max)."""
    runs = results.in_group("R9")
    if runs.empty or "lambda_max" not in runs:
        return None
    table = runs[["norm", "lr", "momentum", "status", "lambda_max"]].copy()
    done = table[table["lambda_max"].notna()]
    fig, axes = new_figure(1, 1)
    ax = axes[0][0]
    for norm, part in done.groupby("norm"):
        part = part.sort_values("lr")
        ax.plot(part["lr"], part["lambda_max"], "o-", color=NORM_COLORS.get(norm), label=norm)
    lrs = np.geomspace(table["lr"].min(), table["lr"].max(), 50)
    momentum = float(table["momentum"].iloc[0])
    ax.plot(lrs, 2 / lrs, "k:", label="2/lr")
    ax.plot(lrs, 2 * (1 + momentum) / lrs, "k--", label=f"2(1+{momentum:g})/lr")
    diverged = table[table["status"] == "diverged"]
    norms = sorted(diverged["norm"].unique())
    used = [DIVERGED for row, norm in enumerate(norms) if diverged_strip(
        ax, diverged.loc[diverged["norm"] == norm, "lr"], NORM_COLORS.get(norm), row, len(norms))]
    label_axes(ax, "learning rate (constant)", "lambda_max at end of training", xlog=True,
               ylog=True)
    marker_legend(ax, used)
    return fig, table


@figure("R9", "sharpness_over_training", "Sharpness over training vs 2/lr")
def _sharpness_over_training(results: StudyResults) -> Drawn:
    """lambda_max of the loss on the run's first mini-batch (train-mode BN, running statistics
    frozen) during training; dotted 2/lr, dashed 2(1+momentum)/lr (the heavy-ball stability
    edge)."""
    records = require(results.records("sharpness"))
    table = records[["norm", "lr", "step", "quantity", "value"]]
    lrs = sorted(table["lr"].unique())
    fig, axes = new_figure(1, len(lrs), sharey=True)
    for ax, lr in zip(axes[0], lrs, strict=True):
        part = table[table["lr"] == lr]
        for norm, line in part[part["quantity"] == "lambda_max"].groupby("norm"):
            ax.plot(line["step"], line["value"], "o-", ms=3, color=NORM_COLORS.get(norm),
                    label=norm)
        for quantity, style in (("two_over_lr", ":"), ("two_one_plus_momentum_over_lr", "--")):
            values = part.loc[part["quantity"] == quantity, "value"]
            if len(values):
                ax.axhline(float(values.iloc[0]), color="k", ls=style, lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"lr {lr:g}")
    axes[0][0].set_ylabel("lambda_max (first batch)")
    axes[0][0].legend()
    return fig, table


@figure("R8",
        "lr_range_test",
        "LR range test beside the largest stable lr",
        "Bias-corrected EMA of the mini-batch loss (train-mode BN) while the lr "
        "ramps exponentially from initialization; dashed: the largest lr of the "
        f"R9 sweep whose constant-lr run trains ({TRAINS_DEFINITION}).")
def _range_figure(results: StudyResults) -> Drawn:
    records = require(results.records("lr_range"))
    curve = records[records["quantity"] == "loss"][["norm", "lr", "value", "smoothed"]]
    stable = _stable_table(results)
    fig, axes = new_figure(1, 1)
    ax = axes[0][0]
    for norm, part in curve.groupby("norm"):
        ax.plot(part["lr"], part["smoothed"], color=NORM_COLORS.get(norm), label=norm)
        edge = stable.loc[stable["norm"] == norm, "largest_trained_lr"]
        if len(edge) and not math.isnan(float(edge.iloc[0])):
            ax.axvline(float(edge.iloc[0]), color=NORM_COLORS.get(norm), ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate (ramped)")
    ax.set_ylabel("smoothed training loss")
    ax.legend()
    data = curve.merge(stable[["norm", "largest_stable_lr", "largest_trained_lr"]], on="norm",
                       how="left")
    return fig, data
