"""Two study folders of one plan, compared run by run: which runs changed status, whether they
lie where the data cannot decide divergence (their curve's frontier bracket), and whether
p(diverge) differs between the two ways they were executed (e.g. `--pack 1` and `--pack 8`).

The runs are paired by run id (the same spec: the same seed, replicate and initial weights), so
the comparison is a paired one: `paired_divergence` counts the runs that diverged in one folder
only, and tests "p(diverge) is the same in both" with McNemar's exact test (the runs that
diverged in exactly one folder split 50:50 under it), with a 95 % Wald interval for the paired
difference of the two proportions. Cost: pandas over two `load_results` tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from normlab.studies._findings import Finding

FINISHED = ("completed", "diverged")
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def paired_runs(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The runs finished in both `load_results` tables, one row each: run_id, the settings of
    `a`, and per folder its status, p_diverge and edge (suffixes "_a" and "_b")."""
    keep = ["run_id", "status", "p_diverge", "edge"]
    both = a.merge(b[keep], on="run_id", suffixes=("_a", "_b"))
    return both[both["status_a"].isin(FINISHED) & both["status_b"].isin(FINISHED)]


def flipped_runs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The paired runs that diverged in one folder and not in the other."""
    return pairs[pairs["status_a"] != pairs["status_b"]]


@dataclass(frozen=True)
class PairedDivergence:
    """Divergence counts of the same runs executed two ways (a and b)."""

    runs: int
    diverged_a: int
    diverged_b: int
    only_a: int  # diverged in a, completed in b
    only_b: int

    @property
    def p_a(self) -> float:
        return self.diverged_a / self.runs if self.runs else math.nan

    @property
    def p_b(self) -> float:
        return self.diverged_b / self.runs if self.runs else math.nan

    @property
    def difference(self) -> float:
        """p_b - p_a."""
        return self.p_b - self.p_a

    @property
    def interval(self) -> tuple[float, float]:
        """95 % Wald interval of p_b - p_a for paired proportions."""
        if not self.runs:
            return math.nan, math.nan
        n, d = self.runs, self.difference
        variance = ((self.only_a + self.only_b) / n - d * d) / n
        half = Z95 * math.sqrt(max(variance, 0.0))
        return d - half, d + half

    @property
    def p_value(self) -> float:
        """McNemar's exact test, two-sided: P(a split of the discordant runs at least as
        uneven as this one) when each goes either way with probability 1/2."""
        from scipy.stats import binomtest  # scipy.stats costs ~1 s to import (measured, loaded)

        discordant = self.only_a + self.only_b
        if not discordant:
            return 1.0
        return float(binomtest(self.only_b, discordant, 0.5).pvalue)


def paired_divergence(pairs: pd.DataFrame) -> PairedDivergence:
    """The divergence counts of `paired_runs` rows (a run diverged: status "diverged")."""
    a, b = pairs["status_a"].eq("diverged"), pairs["status_b"].eq("diverged")
    return PairedDivergence(runs=len(pairs), diverged_a=int(a.sum()), diverged_b=int(b.sum()),
                            only_a=int((a & ~b).sum()), only_b=int((b & ~a).sum()))


def verdicts(findings: Sequence[Finding]) -> list[tuple[str, str, str | None]]:
    """(experiment, claim, verdict) of each finding: what must agree between two folders (the
    measured numbers beside a verdict, e.g. accuracies, differ by float reassociation)."""
    return [(f.experiment, f.claim, f.verdict) for f in findings]


def same_brackets(a: pd.DataFrame, b: pd.DataFrame, curve: Sequence[str]) -> bool:
    """Whether two tables of frontier brackets (`_trains.stable_and_trained` columns, one row
    per setting of `curve`) hold the same curves with the same brackets (NaN equal to NaN)."""
    columns = ["largest_stable_lr", "smallest_always_diverged_lr"]
    left = a.groupby(list(curve))[columns].first()
    right = b.groupby(list(curve))[columns].first()
    return left.index.equals(right.index) and all(
        np.array_equal(left[c].to_numpy(float), right.loc[left.index, c].to_numpy(float),
                       equal_nan=True) for c in columns)


def _ends(brackets: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """A bracket table's (low, high) ends with the open ones at -inf and +inf."""
    return (brackets["largest_stable_lr"].fillna(-math.inf),
            brackets["smallest_always_diverged_lr"].fillna(math.inf))


def brackets_overlap(a: pd.DataFrame, b: pd.DataFrame, curve: Sequence[str]) -> bool:
    """Whether every curve's frontier bracket in `a` meets its bracket in `b` (closed intervals,
    a NaN end open): two folders whose frontiers could lie at the same lr."""
    left = a.groupby(list(curve))[["largest_stable_lr", "smallest_always_diverged_lr"]].first()
    right = b.groupby(list(curve))[["largest_stable_lr", "smallest_always_diverged_lr"]].first()
    if not left.index.equals(right.index):
        return False
    (low_a, high_a), (low_b, high_b) = _ends(left), _ends(right.loc[left.index])
    return bool((np.maximum(low_a, low_b) <= np.minimum(high_a, high_b)).all())


def within_bracket(runs: pd.DataFrame, brackets: pd.DataFrame, curve: Sequence[str]
                   ) -> pd.Series:
    """Per run: does its lr lie within its curve's frontier bracket, ends included (where the
    grid's data cannot say which side of the frontier it is on)? False for a run whose curve
    has no bracket."""
    ends = brackets.groupby(list(curve))[["largest_stable_lr",
                                          "smallest_always_diverged_lr"]].first()
    low, high = _ends(ends)
    table = runs[[*curve, "lr"]].merge(pd.DataFrame({"low": low, "high": high}).reset_index(),
                                       on=list(curve), how="left")
    inside = (table["low"] <= table["lr"]) & (table["lr"] <= table["high"])
    return pd.Series(inside.to_numpy(), index=runs.index)
