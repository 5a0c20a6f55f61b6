"""The `rmt` study (E9): random initialization through the lens of random matrix theory.

- Products of M Gaussian N(0, 1/N) matrices for M in {1, 3, 5, ...}: singular-value histograms
  against the closed-form Fuss-Catalan density (nothing fitted), and the largest singular value,
  condition number and share of tiny singular values versus M.
- The same on normlab networks at initialization: the singular values of the input-output
  Jacobian (Golub-Kahan-Lanczos on JVPs/VJPs, no Jacobian built) of deep linear MLPs and of
  CIFAR ResNets (input -> stage3 feature map) with and without BN, for each init scheme.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from normlab.probes.rmt import fuss_catalan_singular_value_density, fuss_catalan_support
from normlab.runs.spec import RunSpec
from normlab.studies import figures as plot
from normlab.studies._findings import Finding, verdict
from normlab.studies._scales import ScaleConfig, default_data, pick_scale
from normlab.studies._theory_tasks import JACOBIAN_TASK, RMT_TASK
from normlab.studies.base import Study, StudyResults, register_study

INITS = ("xavier_normal", "kaiming_normal", "orthogonal", "delta_orthogonal")
PAPER_EDGES = {1: 2.00, 3: 3.08, 5: 3.86}  # the paper's largest singular values (E9)


@dataclass(frozen=True)
class RmtScale(ScaleConfig):
    """Products of M in `factors` matrices of size `matrix_size`; Jacobians of a linear MLP and
    a ResNet at initialization on `examples` images, per init and norm."""

    factors: tuple[int, ...]
    matrix_size: int
    mlp_depth: int
    mlp_width: int
    resnet_depth: int
    resnet_width: int
    examples: int
    norms: tuple[str, ...]
    inits: tuple[str, ...] = INITS


SCALES = {
    # digits (64 inputs): seconds on 2 CPU cores
    "smoke": RmtScale(factors=(1, 3, 5), matrix_size=1000, mlp_depth=10, mlp_width=64,
                      resnet_depth=8, resnet_width=4, examples=4, norms=("none", "batch")),
    # CIFAR-10 inputs: minutes on one GPU (Lanczos over up to 3072 x examples inputs)
    "reduced": RmtScale(factors=(1, 2, 3, 4, 5), matrix_size=1000, mlp_depth=20, mlp_width=256,
                        resnet_depth=20, resnet_width=16, examples=2, norms=("none", "batch")),
    "paper": RmtScale(factors=(1, 3, 5, 10), matrix_size=2000, mlp_depth=50, mlp_width=512,
                      resnet_depth=110, resnet_width=16, examples=2, norms=("none", "batch")),
}


@register_study
class RmtStudy(Study):
    name = "rmt"
    description = ("E9: singular values of products of Gaussian matrices vs the Fuss-Catalan "
                   "law, and input-output Jacobian spectra of networks at initialization per "
                   "init scheme, with and without BN.")
    experiments = ("E9",)

    # -- the grid ---------------------------------------------------------------------------------
    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        s = pick_scale(SCALES, scale)
        data = default_data(scale, data)
        specs = [RunSpec(task=RMT_TASK, group="E9-products", data=data, model="mlp", norm="none",
                         seed=0,
                         options={"M": m, "N": s.matrix_size}) for m in s.factors]
        for init in s.inits:
            for norm in s.norms:
                specs.append(RunSpec(
                    task=JACOBIAN_TASK, group="E9-jacobian", data=data, model="mlp",
                    depth=s.mlp_depth, width=s.mlp_width, norm=norm, init=init,
                    options={"activation": "linear", "examples": s.examples}))
                specs.append(RunSpec(
                    task=JACOBIAN_TASK, group="E9-jacobian", data=data, model="resnet",
                    depth=s.resnet_depth, width=s.resnet_width, norm=norm, init=init,
                    options={"examples": s.examples, "layer": "stage3"}))
        return specs

    # -- figures ----------------------------------------------------------------------------------
    def figures(self, results: StudyResults, fig_dir: Path) -> list[plot.FigureInfo]:
        return plot.draw_figures(results, fig_dir, _products_figure, _conditioning_figure,
                            _jacobian_figure)

    # -- findings ---------------------------------------------------------------------------------
    def findings(self, results: StudyResults) -> list[Finding]:
        rows = []
        products = _product_runs(results)
        if not products.empty:
            ours = {int(r["options.M"]): float(r["sv_max"]) for _, r in products.iterrows()}
            common = sorted(set(ours) & set(PAPER_EDGES))
            if common:
                edges = {m: math.sqrt((m + 1) ** (m + 1) / m ** m) for m in common}
                size = int(products["options.N"].iloc[0])
                rows.append(Finding(
                    "E9", f"Largest singular value of a product of M = "
                    f"{', '.join(map(str, common))} Gaussian N(0, 1/N) matrices (the edge of "
                    "the Fuss-Catalan support)",
                    ", ".join(f"{PAPER_EDGES[m]:.2f}" for m in common),
                    "closed form " + ", ".join(f"{edges[m]:.3f}" for m in common)
                    + f"; sampled max at N = {size}: "
                    + ", ".join(f"{ours[m]:.2f}" for m in common),
                    # finite N approaches the edge slowly from below (more so for large M)
                    verdict(all(abs(edges[m] - PAPER_EDGES[m]) < 0.01
                                and 0.85 * edges[m] < ours[m] < 1.05 * edges[m]
                                for m in common))))
            ordered = products.sort_values("options.M")
            tiny = ordered["sv_tiny_share"].to_numpy()
            rows.append(Finding(
                "E9", "The product becomes ill-conditioned with depth: the share of tiny "
                "singular values (< 0.1 rms) grows with M while mean s^2 stays 1",
                "grows with M (histograms)",
                "tiny share " + ", ".join(f"M={int(m)}: {t:.3f}" for m, t in
                                          zip(ordered["options.M"], tiny, strict=True))
                + "; mean s^2 " + ", ".join(f"{r ** 2:.2f}" for r in ordered["sv_rms"]),
                verdict(bool(np.all(np.diff(tiny) > 0)))))
        jac = _jacobian_runs(results)
        linear = jac[(jac["model"] == "mlp") & (jac["norm"] == "none")] if not jac.empty else jac
        if not linear.empty:
            cond = linear.set_index("init")["jac_condition"]
            if {"orthogonal", "xavier_normal"} <= set(cond.index):
                rows.append(Finding(
                    "E9", "Orthogonal initialization makes a deep linear network an isometry "
                    "(all Jacobian singular values 1); Gaussian (Xavier) does not",
                    "not in the paper (review R7)",
                    f"condition number at depth {int(linear['depth'].iloc[0])}: orthogonal "
                    f"{cond['orthogonal']:.3g}, xavier {cond['xavier_normal']:.3g}",
                    verdict(bool(cond["orthogonal"] < 1 + 1e-6 < cond["xavier_normal"]))))
        return rows


# -- measurements, as tables ---------------------------------------------------------------------

def _group(results: StudyResults, group: str) -> pd.DataFrame:
    runs = results.runs
    if runs.empty or "group" not in runs:
        return pd.DataFrame()
    return runs[(runs["group"] == group) & (runs["status"] == "completed")]


def _product_runs(results: StudyResults) -> pd.DataFrame:
    return _group(results, "E9-products")


def _jacobian_runs(results: StudyResults) -> pd.DataFrame:
    return _group(results, "E9-jacobian")


# -- figures ---------------------------------------------------------------------------------------

@plot.figure("E9", "rmt_products", "Singular values of products of Gaussian matrices")
def _products_figure(results: StudyResults) -> plot.Drawn:
    """Histogram of the singular values of W_M...W_1, W_i with i.i.d. N(0, 1/N) entries (no
    network, BN mode not applicable), against the closed-form Fuss-Catalan density 2 s f(s^2)
    (not fitted)."""
    records = plot.require(results.records("rmt_product"))
    values = records[records["quantity"] == "singular_value"]
    factors = sorted(int(m) for m in values["options.M"].unique())
    fig, axes = plot.new_figure(1, len(factors))
    for ax, m in zip(axes[0], factors, strict=True):
        s = values.loc[values["options.M"] == m, "value"].to_numpy()
        edge = math.sqrt(fuss_catalan_support(m))
        ax.hist(s, bins=40, range=(0, edge * 1.05), density=True, color="#1f77b4", alpha=0.6,
                label=f"sampled, N={int(values['options.N'].iloc[0])}")
        grid = np.linspace(1e-4, edge, 400)
        ax.plot(grid, fuss_catalan_singular_value_density(grid, m), "k-", lw=1.2,
                label="Fuss-Catalan (closed form)")
        ax.axvline(edge, color="#d62728", ls=":", lw=1, label=f"edge {edge:.2f}")
        ax.set_xlabel("singular value s")
        ax.set_ylabel("density")
        ax.set_title(f"product of M = {m}")
        ax.set_ylim(0, min(ax.get_ylim()[1], 3.0))
    axes[0][0].legend()
    data = values[["options.M", "options.N", "rank", "value"]].rename(
        columns={"options.M": "M", "options.N": "N", "value": "singular_value"})
    return fig, data


@plot.figure("E9", "rmt_conditioning", "Conditioning of the product versus M")
def _conditioning_figure(results: StudyResults) -> plot.Drawn:
    """Largest singular value (with the Fuss-Catalan edge), condition number and share of singular
    values below 0.1 x rms of W_M...W_1 (Gaussian N(0, 1/N) entries; BN mode not applicable)."""
    runs = plot.require(_product_runs(results))
    table = runs[["options.M", "sv_max", "sv_edge_theory", "sv_condition", "sv_tiny_share",
                  "sv_rms"]].rename(columns={"options.M": "M"}).sort_values("M")
    fig, axes = plot.new_figure(1, 3)
    ax = axes[0][0]
    ax.plot(table["M"], table["sv_max"], "o-", label="sampled")
    ax.plot(table["M"], table["sv_edge_theory"], "k--", label="edge sqrt((M+1)^(M+1)/M^M)")
    ax.set_ylabel("largest singular value")
    ax.legend()
    axes[0][1].semilogy(table["M"], table["sv_condition"], "o-")
    axes[0][1].set_ylabel("condition number max/min")
    axes[0][2].plot(table["M"], table["sv_tiny_share"], "o-")
    axes[0][2].set_ylabel("share of s < 0.1 rms")
    for a in axes[0]:
        a.set_xlabel("number of matrices M")
    return fig, table


@plot.figure("E9", "jacobian_spectra", "Input-output Jacobian spectra at initialization")
def _jacobian_figure(results: StudyResults) -> plot.Drawn:
    """Sorted singular values (divided by their rms) of the Jacobian of the batch output with
    respect to the batch input at initialization, by Golub-Kahan-Lanczos on JVPs/VJPs; BN mode:
    train (batch statistics, dashed lines). A flat line at 1 is an isometry."""
    records = plot.require(results.records("jacobian_spectrum"))
    values = records[records["quantity"] == "singular_value"].copy()
    values["rms"] = values.groupby("run_id")["value"].transform(lambda v: np.sqrt((v ** 2).mean()))
    values["relative"] = values["value"] / values["rms"]
    values["fraction"] = values.groupby("run_id")["rank"].transform(lambda r: r / max(r.max(), 1))
    models = sorted(values["model"].unique())
    fig, axes = plot.new_figure(1, len(models))
    for ax, model in zip(axes[0], models, strict=True):
        part = values[values["model"] == model]
        for (init, norm), line in part.groupby(["init", "norm"]):
            ax.plot(line["fraction"], line["relative"].clip(lower=1e-8),
                    "-" if norm == "none" else "--", color=plot.INIT_COLORS.get(init),
                    label=f"{init}, {norm}")
        ax.set_yscale("log")
        ax.set_xlabel("rank / number of values")
        ax.set_ylabel("singular value / rms")
        kind = "deep linear MLP" if model == "mlp" else "ResNet (input -> stage3)"
        ax.set_title(f"{kind}, depth {int(part['depth'].iloc[0])}")
    axes[0][0].legend()
    data = values[["model", "depth", "width", "norm", "init", "rank", "value", "relative"]]
    return fig, data
