"""Paper-vs-normlab findings of the `gradients` study (E3, E4, E6, E8), at initialization."""

from __future__ import annotations

import math

import pandas as pd

from normlab.studies._findings import Finding, verdict_if_measured
from normlab.studies._gradients_figures import at_step
from normlab.studies.base import StudyResults


def gradient_findings(results: StudyResults) -> list[Finding]:
    out = []
    for finding in (_e3_range, _e4_explosion, _e6_growth, _e8_cancellation):
        found = finding(results)
        if found is not None:
            out.append(found)
    return out


def _per_norm(frame: pd.DataFrame, reduce) -> dict[str, float]:
    return {norm: reduce(part) for norm, part in frame.groupby("norm")}


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def _first_step(results: StudyResults, probe: str, quantity: str) -> pd.DataFrame | None:
    """The `probe`'s records of `quantity` at each run's first measurement, or None when the
    probe recorded nothing."""
    rec = results.records(probe)
    return None if rec.empty else at_step(rec[rec["quantity"] == quantity])


def _e3_range(results: StudyResults) -> Finding | None:
    rec = _first_step(results, "gradient_histogram", "range")
    if rec is None:
        return None
    ranges = _per_norm(rec, lambda p: float(p["value"].iloc[0]))
    ratio = _ratio(ranges.get("none"), ranges.get("batch"))
    return Finding("E3", "Without BN, gradients at initialization are ~100x wider than with BN",
                   "range ~±0.04 with BN, ~100x wider without (ResNet-110, layer 55)",
                   f"range {ranges.get('batch', math.nan):.3g} with BN, "
                   f"{ranges.get('none', math.nan):.3g} without: ratio {ratio:.3g}",
                   *verdict_if_measured(ratio, ratio > 10, "range ratio (no BN / BN) > 10"))


def _e4_explosion(results: StudyResults) -> Finding | None:
    rec = results.records("step_loss")
    if rec.empty:
        return None
    rec = rec[(rec["batch"] == "same") & (rec["minibatch"] == rec["minibatch"].min())]
    none, bn = rec[rec["norm"] == "none"], rec[rec["norm"] == "batch"]
    if none.empty or bn.empty:
        return None
    blown = none[none["value"].fillna(math.inf) > 1e6]
    first = blown["step_size"].min() if not blown.empty else math.nan
    bn_max = bn["value"].max()
    first_text = "none up to s = 0.1" if math.isnan(first) else f"{first:.3g}"
    return Finding("E4", "Without BN the loss along the gradient explodes at small steps; with "
                   "BN it stays within a factor of a few",
                   "no BN: past 1e6 by s ~ 3e-3; BN: within a few x up to s = 0.1",
                   f"no BN: first s with L(s)/L(0) > 1e6: {first_text}; BN: max ratio "
                   f"{bn_max:.3g} on s in [1e-5, 0.1]",
                   *verdict_if_measured(bn_max, bool(first <= 0.1 and bn_max < 10),
                                        "no BN past 1e6 at some s <= 0.1; BN's ratio < 10"))


def _e6_growth(results: StudyResults) -> Finding | None:
    rec = _first_step(results, "activation_stats", "variance")
    if rec is None:
        return None

    def growth(part: pd.DataFrame) -> float:
        std = part.assign(std=part["value"].clip(lower=0) ** 0.5).groupby("depth")["std"]
        medians = std.median().sort_index()
        return float(medians.iloc[-1] / medians.iloc[0]) if medians.iloc[0] > 0 else math.nan

    grown = _per_norm(rec, growth)
    none, bn = grown.get("none", math.nan), grown.get("batch", math.nan)
    return Finding("E6", "Without BN channel statistics grow exponentially with depth",
                   "no BN: ~1e-1.5 to ~1e3.5 over 110 layers; BN: within ~1e-1...1e1",
                   f"median channel std, last / first measured layer: no BN {none:.3g}, "
                   f"BN {bn:.3g}",
                   *verdict_if_measured(none + bn, none > 10 * bn, "no BN's growth > 10x BN's"))


def _e8_cancellation(results: StudyResults) -> Finding | None:
    rec = _first_step(results, "gradient_coherence", "coherence_median")
    if rec is None:
        return None
    means = _per_norm(rec, lambda p: float(p["value"].mean()))
    ratio = _ratio(means.get("none"), means.get("batch"))
    return Finding("E8", "With BN the terms of a gradient cancel; without BN they share a sign",
                   "|Σ| / Σ|·| ~2 orders smaller with BN than without (Table 1)",
                   f"median coherence averaged over layers: no BN "
                   f"{means.get('none', math.nan):.3g}, BN {means.get('batch', math.nan):.3g} "
                   f"(ratio {ratio:.3g})",
                   *verdict_if_measured(ratio, ratio > 10, "coherence ratio (no BN / BN) > 10"))
