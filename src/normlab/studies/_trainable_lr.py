"""The largest learning rate that still trains: stable (no divergence) *and* learned something.

A constant-lr run at a too-large rate often neither diverges (its loss stays below the
divergence threshold) nor learns (chance-level accuracy). `largest_trainable_lr` counts such a
run as unstable: it relabels completed runs whose final test accuracy is below `min_acc` as
diverged and then reads the table with `largest_stable_lr`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from normlab.studies._stable_lr import largest_stable_lr


def largest_trainable_lr(runs: pd.DataFrame, by: Sequence[str], min_acc: float) -> pd.DataFrame:
    """Per group of `by`: `largest_stable_lr` among runs that completed with test_acc >=
    `min_acc` (other completed runs count as diverged), and `smallest_diverged_lr`."""
    if runs.empty or "status" not in runs:
        return largest_stable_lr(runs, by)
    runs = runs.copy()
    accuracy = runs["test_acc"] if "test_acc" in runs else pd.Series(float("nan"), runs.index)
    failed = (runs["status"] == "completed") & ~(accuracy >= min_acc)
    runs.loc[failed, "status"] = "diverged"
    return largest_stable_lr(runs, by)


def log_y_if_positive(ax, values: pd.Series) -> None:
    """A log y axis for a column of learning rates, unless none is positive (no run trained),
    where matplotlib would refuse to draw."""
    numbers = pd.to_numeric(values, errors="coerce")
    if (numbers > 0).any():
        ax.set_yscale("log")
