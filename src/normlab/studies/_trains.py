"""What "stable" and "trains" mean in every study, and the largest learning rate by each.

- **stable** (the paper's divergence criterion, science.md): the run never had a non-finite
  mini-batch loss nor one above `diverge_loss` (status "completed", not "diverged").
- **trains**: stable *and* a final test accuracy of at least `TRAINS_MIN_TEST_ACC` (twice chance
  on the 10-class data sets normlab bundles). A constant-lr run at too large a rate often neither
  diverges nor learns; this criterion sets such a dead run apart.

An lr counts as stable (or as training) for a setting only if every seed of it was. Failed and
unfinished runs say nothing about stability and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

TRAINS_MIN_TEST_ACC = 0.2
TRAINS_DEFINITION = (f"a run trains when it did not diverge (every mini-batch loss finite and "
                     f"<= diverge_loss) and its final test accuracy (eval mode) is at least "
                     f"{TRAINS_MIN_TEST_ACC:.0%}, twice chance on 10 classes; an lr trains when "
                     f"every seed does")
COLUMNS = ("largest_stable_lr", "largest_trained_lr", "smallest_diverged_lr", "lrs_tried",
           "largest_lr_tried", "stable_censored", "trained_censored")


def worst_seed(runs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """One row per setting of `by` and lr: "diverged" if any seed diverged, else "completed",
    with the lowest final test accuracy over seeds. Only completed and diverged runs count."""
    done = runs[runs["status"].isin(["completed", "diverged"])] if "status" in runs else runs
    if done.empty:
        return pd.DataFrame(columns=[*by, "lr", "status", "test_acc"])
    acc = pd.to_numeric(done["test_acc"], errors="coerce") if "test_acc" in done else np.nan
    grouped = done.assign(test_acc=acc, diverged=done["status"].eq("diverged")).groupby(
        [*by, "lr"], dropna=False)
    table = grouped.agg(diverged=("diverged", "any"), test_acc=("test_acc", "min"))
    table["status"] = np.where(table["diverged"], "diverged", "completed")
    return table.drop(columns="diverged").reset_index()


def trains(runs: pd.DataFrame) -> pd.Series:
    """Per row: did the run train (completed, final test accuracy >= TRAINS_MIN_TEST_ACC)?"""
    accuracy = pd.to_numeric(runs["test_acc"], errors="coerce") if "test_acc" in runs \
        else pd.Series(np.nan, index=runs.index)
    return runs["status"].eq("completed") & (accuracy >= TRAINS_MIN_TEST_ACC)


def stable_and_trained(runs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per setting of `by`: the largest lr that was stable and the largest that trained (NaN
    where none), the smallest lr that diverged, how many lrs were tried and the largest, and
    whether each limit is censored (reached at the largest lr tried: the true limit lies at or
    above it)."""
    table = worst_seed(runs, by)
    if table.empty:
        return pd.DataFrame(columns=[*by, *COLUMNS])
    nan = float("nan")
    rows = []
    for key, group in table.groupby(list(by), dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        stable = group.loc[group["status"] == "completed", "lr"]
        trained = group.loc[trains(group), "lr"]
        diverged = group.loc[group["status"] == "diverged", "lr"]
        top = float(group["lr"].max())
        largest_stable = float(stable.max()) if len(stable) else nan
        largest_trained = float(trained.max()) if len(trained) else nan
        rows.append({**dict(zip(by, key, strict=True)),
                     "largest_stable_lr": largest_stable, "largest_trained_lr": largest_trained,
                     "smallest_diverged_lr": float(diverged.min()) if len(diverged) else nan,
                     "lrs_tried": len(group), "largest_lr_tried": top,
                     "stable_censored": largest_stable == top,
                     "trained_censored": largest_trained == top})
    return pd.DataFrame(rows, columns=[*by, *COLUMNS])


def lr_text(value: float, censored: bool = False) -> str:
    """An lr limit for a findings table: '>= 3' when censored, 'no lr of the grid' when NaN."""
    if np.isnan(value):
        return "no lr of the grid"
    return f">= {value:g}" if censored else f"{value:g}"
