"""The `radial` study (R2-R4): is the gradient that limits the learning rate radial?

Per norm kind and learning rate:
- R2: radial and tangential norms of each layer's mini-batch gradient over training (the
  "radial" callback), and the radial share of the mean gradient (the data-independent
  component, averaged over many batches) at initialization and at the end;
- R3: the loss along the mean-gradient descent direction versus a random filter-normalized
  direction orthogonal to it, in 1-D and 2-D slices (train-mode BN on fixed batches);
- R4: the largest stable learning rate with full, tangential-only and radial-only weight
  updates (`RunSpec.update_projection`), from short constant-lr runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from normlab.probes import landscape, mean_gradient
from normlab.probes._batches import fixed_batches
from normlab.probes._batches import norm as norm_of
from normlab.probes.landscape import random_direction, scaled_direction
from normlab.probes.mean_gradient import mean_gradient_direction
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext, register_task
from normlab.studies._findings import Finding, verdict
from normlab.studies._options import Option, declare_options, read_options
from normlab.studies._scales import TrainScale, default_data, pick_scale, resnet_spec
from normlab.studies._trains import TRAINS_DEFINITION, stable_and_trained
from normlab.studies.base import Study, StudyResults, register_study
from normlab.studies.figures import (
    NORM_COLORS,
    Drawn,
    FigureInfo,
    draw_figures,
    figure,
    grouped_bars,
    label_axes,
    marker_legend,
    new_figure,
    require,
    saved_figure,
)
from normlab.train import train
from normlab.train.callbacks import TrainState

TASK = "radial-probes"
PROJECTIONS = ("none", "tangential", "radial")


@dataclass(frozen=True)
class RadialScale(TrainScale):
    """R2/R3: `norms` x `lrs` runs of `steps` (radial probe every `every` steps; mean gradient
    over `mean_batches`, landscapes on `landscape_batches` with `points` / `points_2d` points over
    +-`span`). R4: `norms` x projections x `stability_lrs` runs of `stability_steps`."""

    stability_lrs: tuple[float, ...]
    stability_steps: int
    every: int
    mean_batches: int
    landscape_batches: int
    points: int
    points_2d: int
    span: float


SCALES = {
    # digits, ResNet-8 of width 8: a few minutes on 2 CPU cores
    "smoke": RadialScale(depth=8, width=8, batch_size=64, steps=40, norms=("none", "batch"),
                         lrs=(0.01, 0.1), stability_lrs=(0.01, 0.1, 1.0, 10.0),
                         stability_steps=30, every=10, mean_batches=6, landscape_batches=2,
                         points=9, points_2d=5, span=0.5),
    # CIFAR-10, ResNet-20: one GPU, hours
    "reduced": RadialScale(depth=20, width=16, batch_size=128, steps=3000,
                           norms=("none", "batch", "group", "layer"), lrs=(0.001, 0.01, 0.1),
                           stability_lrs=tuple(float(v) for v in np.geomspace(1e-4, 10, 11)),
                           stability_steps=400, every=100, mean_batches=64, landscape_batches=4,
                           points=31, points_2d=21, span=0.5),
    # the paper's ResNet-110
    "paper": RadialScale(depth=110, width=16, batch_size=128, steps=20000,
                         norms=("none", "batch", "group", "layer", "batch_renorm"),
                         lrs=(0.0001, 0.003, 0.1),
                         stability_lrs=tuple(float(v) for v in np.geomspace(1e-5, 10, 13)),
                         stability_steps=800, every=200, mean_batches=128, landscape_batches=8,
                         points=41, points_2d=25, span=0.5),
}

OPTIONS = declare_options(
    TASK, mean_batches=Option(8, low=2), landscape_batches=Option(2, low=1),
    points=Option(11, low=2), points_2d=Option(7, low=2),
    span=Option(0.5, kind="float", low=0.0, low_open=True), spectrum=Option(True, kind="bool"))


class _Measurements:
    """A train callback: mean gradient and landscapes at step 0 and at the last step."""

    def __init__(self, spec: RunSpec, options: dict[str, Any]) -> None:
        self.spec, self.options = spec, options
        self.summary: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        """The summary so far (the step-0 numbers): saved by checkpoints, so a resumed run
        keeps them (train/callbacks.py)."""
        return {"summary": dict(self.summary)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.summary = dict(state["summary"])

    def __call__(self, state: TrainState) -> None:
        if state.step not in (0, state.total_steps):
            return
        when = "init" if state.step == 0 else "end"
        batches = fixed_batches(state.train_data, self.spec.batch_size,
                                self.options["mean_batches"], seed=self.spec.seed)
        spectrum_batch = batches[0] if self.options["spectrum"] else None
        result = mean_gradient(state.model, state.loss_fn, batches, spectrum_batch=spectrum_batch)
        rows = [*result.records,
                {"quantity": "stability", "value": result.stability, "bn_mode": "train"},
                {"quantity": "radial_share_total", "value": result.radial_share,
                 "bn_mode": "train"}]
        state.context.log_records("mean_gradient", rows, step=state.step, when=when)
        self.summary[f"mean_grad_radial_share_{when}"] = result.radial_share
        self.summary[f"mean_grad_stability_{when}"] = result.stability
        cosines = [r["value"] for r in result.records if r["quantity"] == "top_singular_cosine"]
        if cosines:
            self.summary[f"mean_grad_top_singular_cosine_{when}"] = float(np.median(cosines))

        # both directions as long as the parameter vector: alpha = 1 moves by ||theta||
        length = norm_of({n: p.detach() for n, p in state.model.named_parameters()})
        d1 = scaled_direction(state.model, mean_gradient_direction(result), scale="unit")
        d2 = random_direction(state.model, seed=self.spec.seed, orthogonal_to=d1)
        d2 = scaled_direction(state.model, d2, scale="unit")
        d1 = {n: t * length for n, t in d1.items()}
        d2 = {n: t * length for n, t in d2.items()}
        few = batches[:self.options["landscape_batches"]]
        span = self.options["span"]
        rows = []
        for direction, label in ((d1, "mean_gradient"), (d2, "random_orthogonal")):
            rows += landscape(state.model, state.loss_fn, few, directions=[direction], span=span,
                              points=self.options["points"], labels=[label])
        rows += landscape(state.model, state.loss_fn, few, directions=[d1, d2], span=span,
                          points=self.options["points_2d"],
                          labels=["mean_gradient", "random_orthogonal"])
        state.context.log_records("landscape", rows, step=state.step, when=when)


@register_task(TASK)
def radial_probes_task(spec: RunSpec, context: RunContext) -> RunResult:
    """Train the spec (its probes included) and measure the mean gradient and landscapes at
    initialization and at the end (options: mean_batches, landscape_batches, points,
    points_2d, span, spectrum: also the per-layer cosine between the mean gradient and the top
    singular direction of the first batch's exact per-example gradients)."""
    options = read_options(spec)
    measure = _Measurements(spec, options)
    result = train(spec.replace(task="train", options={}), callbacks=[measure], context=context)
    result.final.update(measure.summary)
    return result


@register_study
class RadialStudy(Study):
    name = "radial"
    description = ("R2-R4: radial vs tangential gradients per layer over training, the mean "
                   "gradient's radial share, loss along it vs a random orthogonal direction, "
                   "and the largest stable lr under full, tangential and radial updates.")
    experiments = ("R2", "R3", "R4")

    # -- the grid ---------------------------------------------------------------------------------
    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        s = pick_scale(SCALES, scale)
        data = default_data(scale, data)
        base = resnet_spec(data, depth=s.depth, width=s.width, batch_size=s.batch_size)
        specs = [base.replace(task=TASK, group="R2", norm=norm, lr=lr, steps=s.steps,
                              probes=[{"name": "radial", "every": s.every}],
                              options={"mean_batches": s.mean_batches,
                                       "landscape_batches": s.landscape_batches,
                                       "points": s.points, "points_2d": s.points_2d,
                                       "span": s.span})
                 for norm in s.norms for lr in s.lrs]
        specs += [base.replace(group="R4", norm=norm, lr=lr, update_projection=projection,
                               steps=s.stability_steps, log_every=s.stability_steps)
                  for norm in s.norms for projection in PROJECTIONS for lr in s.stability_lrs]
        return specs

    # -- figures ----------------------------------------------------------------------------------
    def figures(self, results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
        return draw_figures(results, fig_dir, _radial_over_training, _mean_gradient_share,
                            _mean_gradient_top_cosine, _landscape_1d, _landscape_2d,
                            _stable_lr_figure)

    # -- findings ---------------------------------------------------------------------------------
    def findings(self, results: StudyResults) -> list[Finding]:
        rows = []
        shares = _mean_share_table(results)
        if not shares.empty:
            end = shares[shares["when"] == "end"] if (shares["when"] == "end").any() else shares
            by_norm = end.groupby("norm")["value"].median()
            normalized = {k: v for k, v in by_norm.items() if k != "none"}
            if "none" in by_norm and normalized:
                bn = max(normalized.values())
                rows.append(Finding(
                    "R2", "The data-independent gradient component of scale-invariant "
                    "(normalized) weights is tangential; without normalization it has a radial "
                    "part.", "not measured (review's question)",
                    f"median radial share of the mean gradient per layer: none "
                    f"{by_norm['none']:.2g}, normalized at most {bn:.2g} (conv layers; the "
                    f"classifier is not normalized)", verdict(bool(by_norm["none"] > 10 * bn))))
        rows += _landscape_findings(results)
        stable = _stable_table(results)
        if not stable.empty:
            none = stable[stable["norm"] == "none"].set_index("update_projection")
            if {"none", "tangential"} <= set(none.index):
                full, tangential = (none.loc["none", "largest_trained_lr"],
                                    none.loc["tangential", "largest_trained_lr"])
                stable_full, stable_tangential = (none.loc["none", "largest_stable_lr"],
                                                  none.loc["tangential", "largest_stable_lr"])
                rows.append(Finding(
                    "R4", "Radial gradient components constrain the learning rate of "
                    "unnormalized networks: tangential-only updates train at larger rates.",
                    "hypothesis (review)",
                    f"no norm, largest lr that trained (and did not diverge): {full:.3g} "
                    f"({stable_full:.3g}) with full updates vs {tangential:.3g} "
                    f"({stable_tangential:.3g}) tangential-only",
                    None if math.isnan(full) or math.isnan(tangential)
                    else verdict(bool(tangential > full))))
        return rows


def _landscape_findings(results: StudyResults) -> list[Finding]:
    """R3: the best loss drop along the mean-gradient direction vs the random one, at init."""
    table = _landscape_table(results, two_d=False)
    if table.empty:
        return []
    table = table[table["when"] == "init"]
    rows = []
    for norm, part in table.groupby("norm"):
        part = part[part["lr"] == part["lr"].min()]  # at init every lr has the same model
        drops = {}
        for direction, line in part.groupby("direction"):
            at_zero = line.loc[line["alpha"].abs().idxmin(), "value"]
            drops[direction] = 1 - line["value"].min() / at_zero
        if {"mean_gradient", "random_orthogonal"} <= set(drops):
            mean, random = drops["mean_gradient"], drops["random_orthogonal"]
            rows.append(Finding(
                "R3", f"{norm}: moving along the data-independent (mean-gradient) direction "
                "reduces the loss more than moving along a random orthogonal direction.",
                "review's question", f"best loss drop on the 1-D slice at init: "
                f"{100 * mean:.1f} % along the mean gradient vs {100 * random:.1f} % random",
                verdict(bool(mean > random))))
    return rows


# -- measurements, as tables ---------------------------------------------------------------------

def _stable_table(results: StudyResults) -> pd.DataFrame:
    runs = results.in_group("R4")
    if runs.empty:
        return pd.DataFrame()
    return stable_and_trained(runs, ["norm", "update_projection"])


def _mean_share_table(results: StudyResults, quantity: str = "radial_share") -> pd.DataFrame:
    records = results.records("mean_gradient")
    if records.empty or "layer" not in records:
        return pd.DataFrame()
    return records[(records["quantity"] == quantity) & (records["layer"].notna())].copy()


# -- figures ---------------------------------------------------------------------------------------

def _style(lr: float, lrs: list[float]) -> str:
    return ["-", "--", ":", "-."][sorted(lrs).index(lr) % 4]


@figure("R2", "radial_over_training", "Radial and tangential gradient norms")
def _radial_over_training(results: StudyResults) -> Drawn:
    """Median over conv/linear layers of the norm of the radial and tangential parts of the
    mini-batch loss gradient (per layer, train-mode BN, recomputed at the current weights), over
    training at constant lr."""
    records = require(results.records("radial"))
    table = (records[records["quantity"].isin(["radial_norm", "tangential_norm"])]
             .groupby(["norm", "lr", "step", "quantity"], as_index=False)["value"].median())
    fig, axes = new_figure(1, 2)
    lrs = sorted(table["lr"].unique())
    for ax, quantity in zip(axes[0], ("radial_norm", "tangential_norm"), strict=True):
        for (norm, lr), part in table[table["quantity"] == quantity].groupby(["norm", "lr"]):
            ax.plot(part["step"], part["value"].clip(lower=1e-30), _style(lr, lrs),
                    color=NORM_COLORS.get(norm), label=f"{norm}, lr {lr:g}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"median over layers of ||g_{quantity.split('_')[0][:3]}||")
        ax.set_title(quantity.replace("_", " "))
    axes[0][0].legend()
    return fig, table


_MEAN_FIGURES = {
    "radial_share": ("mean_gradient_radial_share", "Radial share of the mean gradient",
                     "||radial part|| / ||mean gradient||", True,
                     "Per conv/linear layer, ||g_rad|| / ||g|| of the gradient averaged over "
                     "many mini-batches (train-mode BN, running statistics frozen), at "
                     "initialization and at the end of training. Weights followed by a norm "
                     "are scale-invariant, so their share is ~0 up to BN's eps."),
    "top_singular_cosine": ("mean_gradient_top_singular_cosine",
                            "Mean gradient vs the top singular direction",
                            "|cos(mean gradient, v_1)|", False,
                            "Per layer, |cosine| between the mean gradient and the top "
                            "right-singular vector v_1 of one batch's B x P matrix of exact "
                            "per-example loss gradients (per_example_loss_grads: through the "
                            "batch-coupled train-mode forward pass)."),
}


def _mean_gradient_figure(results: StudyResults, fig_dir: Path, quantity: str
                          ) -> FigureInfo | None:
    name, title, ylabel, log, caption = _MEAN_FIGURES[quantity]
    table = require(_mean_share_table(results, quantity))
    table = table[["norm", "lr", "when", "layer", "depth", "value"]]
    whens = [w for w in ("init", "end") if w in set(table["when"])]
    fig, axes = new_figure(1, len(whens))
    lrs = sorted(table["lr"].unique())
    for ax, when in zip(axes[0], whens, strict=True):
        for (norm, lr), part in table[table["when"] == when].groupby(["norm", "lr"]):
            part = part.sort_values("depth")
            values = part["value"].clip(lower=1e-17) if log else part["value"]
            ax.plot(part["depth"], values, _style(lr, lrs), marker="o", ms=3,
                    color=NORM_COLORS.get(norm), label=f"{norm}, lr {lr:g}")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("layer depth")
        ax.set_ylabel(ylabel)
        ax.set_title(f"at {when}")
    axes[0][0].legend()
    return saved_figure(fig, fig_dir, table, "R2", name, title, caption)


def _mean_gradient_share(results: StudyResults, fig_dir: Path) -> FigureInfo | None:
    return _mean_gradient_figure(results, fig_dir, "radial_share")


def _mean_gradient_top_cosine(results: StudyResults, fig_dir: Path) -> FigureInfo | None:
    return _mean_gradient_figure(results, fig_dir, "top_singular_cosine")


def _landscape_table(results: StudyResults, two_d: bool) -> pd.DataFrame:
    records = results.records("landscape")
    if records.empty:
        return records
    has_beta = records["beta"].notna() if "beta" in records else pd.Series(False, records.index)
    return records[has_beta] if two_d else records[~has_beta]


@figure("R3", "landscape_1d", "Loss along the mean gradient vs a random direction")
def _landscape_1d(results: StudyResults) -> Drawn:
    """Mean training loss on fixed batches (train-mode BN, running statistics frozen) at theta +
    alpha d, d the descent direction of the mean gradient (solid) or a random filter-normalized
    direction orthogonal to it (dashed), both as long as theta."""
    table = require(_landscape_table(results, two_d=False))
    table = table[["norm", "lr", "when", "direction", "alpha", "value"]]
    keys = sorted(table.groupby(["when", "lr"]).groups, key=lambda k: (k[0] != "init", k[1]))
    fig, axes = new_figure(1, len(keys))
    for ax, (when, lr) in zip(axes[0], keys, strict=True):
        part = table[(table["when"] == when) & (table["lr"] == lr)]
        for (norm, direction), line in part.groupby(["norm", "direction"]):
            ax.plot(line["alpha"], line["value"], "-" if direction == "mean_gradient" else "--",
                    color=NORM_COLORS.get(norm), label=f"{norm}: {direction}")
        ax.set_yscale("log")
        ax.set_xlabel("alpha (step / ||theta||)")
        ax.set_ylabel("loss")
        ax.set_title(f"lr {lr:g}, at {when}")
    axes[0][0].legend()
    return fig, table


@figure("R3", "landscape_2d", "2-D loss slice: mean gradient x random direction")
def _landscape_2d(results: StudyResults) -> Drawn:
    """log10 of the mean training loss on fixed batches (train-mode BN) over the plane spanned by
    the mean-gradient descent direction and a random orthogonal filter-normalized direction, at
    the end of training."""
    table = require(_landscape_table(results, two_d=True))
    table = table[table["when"] == table["when"].iloc[-1]]
    table = table[["norm", "lr", "when", "alpha", "beta", "value"]]
    keys = sorted(table.groupby(["norm", "lr"]).groups)
    fig, axes = new_figure(1, len(keys))
    for ax, (norm, lr) in zip(axes[0], keys, strict=True):
        part = table[(table["norm"] == norm) & (table["lr"] == lr)]
        grid = part.pivot_table(index="beta", columns="alpha", values="value")
        levels = np.log10(grid.to_numpy().clip(min=1e-12))
        image = ax.contourf(grid.columns, grid.index, levels, levels=20, cmap="viridis")
        fig.colorbar(image, ax=ax, label="log10 loss")
        ax.set_xlabel("alpha: mean-gradient descent")
        ax.set_ylabel("beta: random orthogonal")
        ax.set_title(f"{norm}, lr {lr:g}")
    return fig, table


@figure("R4",
        "stable_lr_by_projection",
        "Largest stable lr by update projection",
        f"Filled bars: largest learning rate of the grid whose short constant-lr "
        f"run trains ({TRAINS_DEFINITION}); dashed outlines: the largest that did "
        "not diverge (it may have died). Full updates, or only their tangential or "
        "radial part per filter (conv/linear weights; train-mode BN). '>=': the "
        "largest lr tried; a triangle: none of the grid.")
def _stable_lr_figure(results: StudyResults) -> Drawn:
    table = require(_stable_table(results))
    shades = {"none": "#444444", "tangential": "#1f77b4", "radial": "#d62728"}
    labels = {"none": "full update", "tangential": "tangential only", "radial": "radial only"}
    fig, axes = new_figure()
    ax = axes[0][0]
    used = grouped_bars(ax, table, "norm", "update_projection", PROJECTIONS, colors=shades,
                        labels=labels)
    stable = grouped_bars(ax, table, "norm", "update_projection", PROJECTIONS,
                          column="largest_stable_lr", censored="stable_censored",
                          colors=dict.fromkeys(PROJECTIONS, "none"), labels={})
    for patch in ax.patches[len(ax.patches) // 2:]:  # the second set: outlines only
        patch.set_edgecolor("black")
        patch.set_linestyle("--")
    ax.bar([], [], color="none", edgecolor="black", linestyle="--",
           label="largest lr without divergence (outline)")
    label_axes(ax, "", "largest lr that trained (constant)")
    marker_legend(ax, used | stable)
    return fig, table
