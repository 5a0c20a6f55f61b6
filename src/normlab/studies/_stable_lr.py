"""The largest stable learning rate of a sweep: read off run statuses, grouped by settings.

"Stable" follows the divergence definition (science.md): the run never had a non-finite
mini-batch loss or one above `diverge_loss` (status "completed", not "diverged"). A run can be
stable in that sense and still be dead (collapsed to chance accuracy), so a stricter "trains"
reading also asks for a final test accuracy of at least `min_test_acc`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

COLUMNS = ("largest_stable_lr", "smallest_diverged_lr", "lrs_tried")


def largest_stable_lr(runs: pd.DataFrame, by: Sequence[str],
                      min_test_acc: float | None = None) -> pd.DataFrame:
    """Per group of `by`: the largest lr whose run completed (and, with `min_test_acc`, reached
    that final test accuracy) as `largest_stable_lr`, and the smallest lr whose run diverged.

    Only runs with status "completed" or "diverged" count; failed or unfinished runs say
    nothing about stability and are left out. NaN where no run qualifies.
    """
    if runs.empty or "status" not in runs:
        return pd.DataFrame(columns=[*by, *COLUMNS])
    done = runs[runs["status"].isin(["completed", "diverged"])]
    nan = float("nan")
    rows = []
    for key, group in done.groupby(list(by), dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ok = group[group["status"] == "completed"]
        if min_test_acc is not None:
            accuracy = ok["test_acc"] if "test_acc" in ok else pd.Series(nan, index=ok.index)
            ok = ok[accuracy >= min_test_acc]
        diverged = group.loc[group["status"] == "diverged", "lr"]
        rows.append({**dict(zip(by, key, strict=True)),
                     "largest_stable_lr": float(ok["lr"].max()) if len(ok) else nan,
                     "smallest_diverged_lr": float(diverged.min()) if len(diverged) else nan,
                     "lrs_tried": len(group)})
    return pd.DataFrame(rows, columns=[*by, *COLUMNS])


def stable_and_trained(runs: pd.DataFrame, by: Sequence[str], min_test_acc: float
                       ) -> pd.DataFrame:
    """`largest_stable_lr` by the divergence criterion, with a `largest_trained_lr` column
    beside it by the "trains" criterion (final test accuracy >= `min_test_acc`)."""
    table = largest_stable_lr(runs, by)
    trained = largest_stable_lr(runs, by, min_test_acc=min_test_acc)
    table["largest_trained_lr"] = trained["largest_stable_lr"].to_numpy()
    return table
