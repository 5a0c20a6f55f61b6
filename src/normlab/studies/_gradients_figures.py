"""Figures of the `gradients` study (E3-E8, R6), drawn from its probe records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from normlab.studies.base import StudyResults
from normlab.studies.figures import (
    NORM_COLORS,
    Drawn,
    FigureInfo,
    draw_figures,
    figure,
    new_figure,
    require,
    save_figure,
)

MODE = "BN mode: train (batch statistics; running statistics frozen during probes)."


def draw_all(results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
    """Every figure of the study; each caption ends with the BN mode of the probes (`MODE`)."""
    drawn = draw_figures(results, fig_dir, histograms, step_loss_grid, anatomy, channel_stats,
                         output_heatmaps, coherence_bars, spectra)
    return [dataclasses.replace(info, caption=f"{info.caption} {MODE}") for info in drawn]


def norms_in(frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(frame["norm"]))
    return [n for n in NORM_COLORS if n in present] + [n for n in present if n not in NORM_COLORS]


def color(norm: str) -> str | None:
    return NORM_COLORS.get(norm)


def at_step(frame: pd.DataFrame, step: int | str = "first") -> pd.DataFrame:
    """Rows of one measurement step ('first', 'last' or an int), per run."""
    if frame.empty:
        return frame
    if step in ("first", "last"):
        pick = frame.groupby("run_id")["step"].transform("min" if step == "first" else "max")
        return frame[frame["step"] == pick]
    return frame[frame["step"] == step]


def info(experiment: str, name: str, title: str, caption: str, files) -> list[FigureInfo]:
    return [FigureInfo(experiment, name, title, caption, files)]


def histograms(results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
    rec = require(results.records("gradient_histogram"))
    rec = at_step(rec[rec["quantity"] == "count"])
    norms = norms_in(rec)
    fig, axes = new_figure(1, len(norms), compact=True)
    for ax, norm in zip(axes[0], norms, strict=True):
        part = rec[rec["norm"] == norm]
        centres = (part["bin_low"] + part["bin_high"]) / 2
        ax.bar(centres, part["value"], width=(part["bin_high"] - part["bin_low"]),
               color=color(norm))
        ax.set_title(f"{norm}: range {part['bin_low'].min():.2g}..{part['bin_high'].max():.2g}")
        ax.set_xlabel("gradient entry")
    axes[0][0].set_ylabel("count")
    layer = rec["layer"].iloc[0]
    files = save_figure(fig, fig_dir, "gradient_histograms", rec)
    return info("E3", "gradient_histograms", "Gradient histograms at initialization",
                f"Entries of the mini-batch gradient (mean loss, not per-example) of layer "
                f"{layer}'s weight at initialization, per norm; note each panel's own x range.",
                files)


@figure("E4", "step_loss_grid", "Relative loss along the mini-batch gradient")
def step_loss_grid(results: StudyResults) -> Drawn:
    """Relative loss L(θ - s g)/L(θ) on the measured batch (solid) and a held-out batch (dashed); g
    is the mini-batch gradient of the mean loss (not per-example); dotted: the divergence
    threshold (loss 1e3)."""
    rec = require(results.records("step_loss"))
    norms, batches = norms_in(rec), sorted(rec["minibatch"].unique())
    fig, axes = new_figure(len(norms), len(batches), compact=True, sharex=True)
    for i, norm in enumerate(norms):
        for j, mb in enumerate(batches):
            ax = axes[i][j]
            part = rec[(rec["norm"] == norm) & (rec["minibatch"] == mb)]
            for tag, style in (("same", "-"), ("held_out", "--")):
                sub = part[part["batch"] == tag].dropna(subset=["value"])
                sub = sub[sub["value"] > 0]
                if not sub.empty:
                    ax.plot(sub["step_size"], sub["value"], style, color=color(norm),
                            label=tag.replace("_", "-"))
            same = part[part["batch"] == "same"]
            if not same.empty:
                ax.axhline(same["threshold"].iloc[0] / same["start_loss"].iloc[0], color="k",
                           lw=0.8, ls=":", label="loss = 1e3")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{norm}, mini-batch {mb}")
            if i == len(norms) - 1:
                ax.set_xlabel("step size s")
            if j == 0:
                ax.set_ylabel("L(θ - s g) / L(θ)")
    axes[0][0].legend()
    return fig, rec


def anatomy(results: StudyResults, fig_dir: Path) -> list[FigureInfo]:
    rec = require(results.records("step_anatomy"))
    rec = at_step(rec)
    out = []
    for quantity in ("mean", "variance"):
        part = rec[rec["quantity"] == quantity].dropna(subset=["layer"])
        norms, depths = norms_in(part), sorted(part["depth"].dropna().unique())
        fig, axes = new_figure(len(norms), len(depths), compact=True)
        for i, norm in enumerate(norms):
            for j, depth in enumerate(depths):
                ax = axes[i][j]
                cell = part[(part["norm"] == norm) & (part["depth"] == depth)]
                grid = cell.pivot_table(index="channel", columns="fraction", values="value")
                shown = np.log10(np.abs(grid.to_numpy(dtype=float)) + 1e-30)
                image = ax.imshow(shown, aspect="auto", origin="lower", cmap="viridis",
                                  extent=(0, 100, 0, max(1, shown.shape[0])))
                fig.colorbar(image, ax=ax, label=f"log10 |{quantity}|")
                step = cell["step_size"].iloc[0] if not cell.empty else float("nan")
                ax.set_title(f"{norm}, layer {int(depth)}, s={step:.2g}")
                ax.set_xlabel("% of step")
                ax.set_ylabel("channel")
        name = f"step_anatomy_{quantity}"
        files = save_figure(fig, fig_dir, name, part)
        out += info("E5", name, f"Per-channel activation {quantity} along a step",
                    f"Per-channel activation {quantity} (log10 magnitude) of layer outputs on the "
                    "line θ → θ - s g (g: mini-batch gradient of the mean loss, not per-example), "
                    "s the first diverging step size of the grid (else 0.1), at initialization.",
                    files)
    return out


@figure("E6", "channel_stats_vs_depth", "Channel mean and std vs depth")
def channel_stats(results: StudyResults) -> Drawn:
    """Median over channels (band: 10-90 %) of |mean| and std over the measurement batch of each
    block's output (the residual stream for a ResNet; depth of the block's last weight layer),
    at initialization (solid) and after training (dashed)."""
    rec = require(results.records("activation_stats"))
    fig, axes = new_figure(1, 2)
    rows = []
    for norm in norms_in(rec):
        for which, style in (("first", "-"), ("last", "--")):
            part = at_step(rec[rec["norm"] == norm], which)
            for ax, quantity, label in ((axes[0][0], "mean", "|channel mean|"),
                                        (axes[0][1], "variance", "channel std")):
                cell = part[part["quantity"] == quantity].copy()
                cell["shown"] = (cell["value"].abs() if quantity == "mean"
                                 else cell["value"].clip(lower=0) ** 0.5)
                q = cell.groupby("depth")["shown"].quantile([0.1, 0.5, 0.9]).unstack()
                if q.empty:
                    continue
                ax.plot(q.index, q[0.5], style, color=color(norm),
                        label=f"{norm} ({'init' if which == 'first' else 'trained'})")
                if which == "first":
                    ax.fill_between(q.index, q[0.1], q[0.9], color=color(norm), alpha=0.15)
                ax.set_yscale("log")
                ax.set_xlabel("depth (weight layer)")
                ax.set_ylabel(label)
                rows += [{"norm": norm, "when": which, "quantity": label, "depth": d,
                          "q10": r[0.1], "median": r[0.5], "q90": r[0.9]}
                         for d, r in q.iterrows()]
    axes[0][0].legend()
    return fig, pd.DataFrame(rows)


@figure("E7", "output_gradients", "Output-layer gradients at initialization")
def output_heatmaps(results: StudyResults) -> Drawn:
    """Per-example loss gradient with respect to the logits, d ℓ_i/d z_i (softmax - one-hot; the
    mean loss's gradient is this / B), examples x classes."""
    rec = require(results.records("output_gradients"))
    rec = at_step(rec)
    norms = norms_in(rec)
    fig, axes = new_figure(1, len(norms), compact=True)
    for ax, norm in zip(axes[0], norms, strict=True):
        grid = rec[rec["norm"] == norm].pivot_table(index="example", columns="class_index",
                                                    values="value")
        image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="RdBu_r",
                          vmin=-1, vmax=1)
        ax.set_title(norm)
        ax.set_xlabel("class")
    axes[0][0].set_ylabel("example")
    fig.colorbar(image, ax=axes[0][-1], label="d ℓ_i / d logit")
    return fig, rec


@figure("R6", "gradient_coherence", "Table 1 as a bar plot: do gradient terms cancel?")
def coherence_bars(results: StudyResults) -> Drawn:
    """Median over kernel entries of |Σ terms| / Σ |terms| for the terms d[b,o,w,h]·a[b,i,w+x,h+y]
    of the mini-batch gradient (not per-example), at initialization; 1 = all terms share a sign,
    small = they cancel (E8)."""
    rec = require(results.records("gradient_coherence"))
    rec = at_step(rec[rec["quantity"] == "coherence_median"])
    norms, depths = norms_in(rec), sorted(rec["depth"].unique())
    fig, axes = new_figure()
    ax = axes[0][0]
    width = 0.8 / max(1, len(norms))
    for k, norm in enumerate(norms):
        part = rec[rec["norm"] == norm].set_index("depth")["value"]
        ax.bar(np.arange(len(depths)) + k * width, [part.get(d, np.nan) for d in depths],
               width=width, color=color(norm), label=norm)
    ax.set_xticks(np.arange(len(depths)) + 0.4 - width / 2)
    ax.set_xticklabels([f"layer {int(d)}" for d in depths])
    ax.set_yscale("log")
    ax.set_ylabel("median |Σ terms| / Σ |terms|")
    ax.legend()
    return fig, rec


@figure("E8", "gradient_spectra", "Per-example gradient spectra")
def spectra(results: StudyResults) -> Drawn:
    """Left: singular values of the B x P matrix of exact per-example loss gradients
    (per_example_loss_grads, through the batch statistics) of a middle layer's weight. Right:
    top-direction energy share vs depth, exact per-example loss gradients (solid) and
    per-example contributions (dashed), at initialization."""
    rec = require(results.records("gradient_spectrum"))
    rec = at_step(rec)
    fig, axes = new_figure(1, 2)
    left, right = axes[0]
    exact = rec[rec["gradient"] == "per_example_loss_grads"]
    middle = exact["depth"].dropna().median()
    for norm in norms_in(rec):
        part = exact[exact["norm"] == norm]
        depths = part["depth"].dropna().unique()
        if len(depths):
            nearest = depths[np.argmin(np.abs(depths - middle))]
            sv = part[(part["depth"] == nearest) & (part["quantity"] == "singular_value")]
            sv = sv.sort_values("index")
            top = sv["value"].iloc[0] if not sv.empty and sv["value"].iloc[0] > 0 else 1.0
            left.plot(sv["index"], sv["value"] / top, color=color(norm),
                      label=f"{norm} (layer {int(nearest)})")
        for gradient, style in (("per_example_loss_grads", "-"),
                                ("per_example_contributions", "--")):
            share = rec[(rec["norm"] == norm) & (rec["gradient"] == gradient)
                        & (rec["quantity"] == "energy_share_top")].sort_values("depth")
            right.plot(share["depth"], share["value"], style, color=color(norm), marker=".")
    left.set_yscale("log")
    left.set_xlabel("index k")
    left.set_ylabel("σ_k / σ_1")
    left.legend()
    right.set_xlabel("depth (weight layer)")
    right.set_ylabel("σ_1² / Σ σ_k²")
    return fig, rec
