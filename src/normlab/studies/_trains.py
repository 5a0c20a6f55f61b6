"""What "stable", "trains" and the divergence frontier mean in every study.

Near the largest stable learning rate, whether a run diverges turns on bit-level perturbations
(a ReLU whose pre-activation is within a rounding error of zero, a thread count, the pack size),
so divergence is measured as a probability (science.md, "Divergence"):

- **p(diverge)** of a point (a setting and its lr): the fraction of its finished runs (completed
  or diverged; failed and unfinished runs say nothing) that diverged, over its seeds and its
  perturbation replicates (`options.replicate`, train/build.py).
- **stable**: p = 0 (every mini-batch loss finite and <= `diverge_loss`, the paper's criterion,
  in every run of the point). **edge**: 0 < p < 1.
- **trains**: a run is stable *and* reaches a final test accuracy of at least
  `TRAINS_MIN_TEST_ACC` (twice chance on the 10-class data sets normlab bundles). A
  constant-lr run at too large a rate often neither diverges nor learns; this sets such a dead
  run apart. An lr trains when every run of its point does.
- **the frontier bracket** of a curve (p against lr for one setting of the other columns):
  [largest_stable_lr, smallest_always_diverged_lr], where largest_stable_lr is the largest lr
  of the grid with p = 0 there *and at every smaller lr tried* (NaN when the smallest lr tried
  already diverged), and smallest_always_diverged_lr the smallest lr with p = 1 (NaN when no lr
  of the grid always diverged: the frontier's top lies above the grid). The frontier lies
  between the two; the lrs strictly between them form the edge band.

Two brackets are ordered when one lies wholly at or above the other (its largest stable lr is at
least the other's smallest always-diverged lr); otherwise they overlap, and the grid cannot say
which frontier is larger (`frontier_order`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

TRAINS_MIN_TEST_ACC = 0.2
TRAINS_DEFINITION = (f"a run trains when it did not diverge (every mini-batch loss finite and "
                     f"<= diverge_loss) and its final test accuracy (eval mode) is at least "
                     f"{TRAINS_MIN_TEST_ACC:.0%}, twice chance on 10 classes; an lr trains when "
                     f"every run of it (seeds and perturbation replicates) does")
FRONTIER_DEFINITION = ("p(diverge): the fraction of a point's runs (seeds and perturbation "
                       "replicates) that diverged; the frontier bracket is [the largest lr with "
                       "p = 0 there and at every smaller lr, the smallest lr with p = 1], and "
                       "the lrs between them (0 < p < 1) are the edge band")
FINISHED = ("completed", "diverged")
COLUMNS = ("largest_stable_lr", "smallest_always_diverged_lr", "largest_trained_lr",
           "smallest_diverged_lr", "edge_lrs", "lrs_tried", "smallest_lr_tried",
           "largest_lr_tried", "stable_censored", "trained_censored")
POINT_COLUMNS = ("lr", "runs", "diverged", "p_diverge", "test_acc", "trains")


def p_diverge(statuses: pd.Series) -> float:
    """The fraction of the finished runs among `statuses` that diverged (NaN: none finished)."""
    finished = statuses[statuses.isin(FINISHED)]
    return float(finished.eq("diverged").mean()) if len(finished) else float("nan")


def is_edge(p: pd.Series | float) -> pd.Series | bool:
    """0 < p < 1: the point's runs both diverged and did not (NaN: False)."""
    return (p > 0) & (p < 1)


def trains(runs: pd.DataFrame) -> pd.Series:
    """Per row: did the run train (completed, final test accuracy >= TRAINS_MIN_TEST_ACC)?"""
    accuracy = pd.to_numeric(runs["test_acc"], errors="coerce") if "test_acc" in runs \
        else pd.Series(np.nan, index=runs.index)
    return runs["status"].eq("completed") & (accuracy >= TRAINS_MIN_TEST_ACC)


def point_table(runs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """One row per setting of `by` and lr: its finished runs, how many diverged, p(diverge), the
    lowest final test accuracy of its completed runs, and whether every run trained."""
    done = runs[runs["status"].isin(FINISHED)] if "status" in runs else runs
    if done.empty:
        return pd.DataFrame(columns=[*by, *POINT_COLUMNS])
    acc = pd.to_numeric(done["test_acc"], errors="coerce") if "test_acc" in done else np.nan
    grouped = done.assign(test_acc=acc, diverged=done["status"].eq("diverged"),
                          trains=trains(done)).groupby([*by, "lr"], dropna=False)
    table = grouped.agg(runs=("status", "size"), diverged=("diverged", "sum"),
                        test_acc=("test_acc", "min"), trains=("trains", "all")).reset_index()
    table["p_diverge"] = table["diverged"] / table["runs"]
    return table[[*by, *POINT_COLUMNS]]


def bracket(points: pd.DataFrame) -> tuple[float, float]:
    """(largest_stable_lr, smallest_always_diverged_lr) of one curve's points (`point_table`
    rows of one setting); NaN where the grid has no such lr."""
    ordered = points.sort_values("lr")
    p, lrs = ordered["p_diverge"].to_numpy(dtype=float), ordered["lr"].to_numpy(dtype=float)
    first_unstable = int(np.argmax(p > 0)) if (p > 0).any() else len(p)
    low = float(lrs[first_unstable - 1]) if first_unstable else float("nan")
    always = lrs[p == 1]
    return low, float(always.min()) if len(always) else float("nan")


def stable_and_trained(runs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per setting of `by`: the frontier bracket (largest_stable_lr, smallest_always_diverged_lr;
    see the module docstring), the largest lr that trained, the smallest lr where any run
    diverged, how many lrs lie in the edge band, how many lrs were tried and the largest, and
    whether each limit is censored (reached at the largest lr tried: the true limit lies at or
    above it)."""
    table = point_table(runs, by)
    if table.empty:
        return pd.DataFrame(columns=[*by, *COLUMNS])
    nan = float("nan")
    rows = []
    for key, group in table.groupby(list(by), dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        low, high = bracket(group)
        trained = group.loc[group["trains"], "lr"]
        diverged = group.loc[group["p_diverge"] > 0, "lr"]
        top = float(group["lr"].max())
        largest_trained = float(trained.max()) if len(trained) else nan
        rows.append({**dict(zip(by, key, strict=True)),
                     "largest_stable_lr": low, "smallest_always_diverged_lr": high,
                     "largest_trained_lr": largest_trained,
                     "smallest_diverged_lr": float(diverged.min()) if len(diverged) else nan,
                     "edge_lrs": int(is_edge(group["p_diverge"]).sum()),
                     "lrs_tried": len(group), "smallest_lr_tried": float(group["lr"].min()),
                     "largest_lr_tried": top,
                     "stable_censored": low == top, "trained_censored": largest_trained == top})
    return pd.DataFrame(rows, columns=[*by, *COLUMNS])


def frontier_order(a: pd.Series, b: pd.Series) -> int:
    """+1 when bracket `a` lies at or above bracket `b` (a's largest stable lr >= b's smallest
    always-diverged lr), -1 when below, 0 when they overlap (rows of `stable_and_trained`)."""
    def above(x: pd.Series, y: pd.Series) -> bool:
        return bool(x["largest_stable_lr"] >= y["smallest_always_diverged_lr"])  # NaN: False

    return 1 if above(a, b) else -1 if above(b, a) else 0


def same_cell(a: pd.Series, b: pd.Series) -> bool:
    """Both frontiers lie in the same single step of the grid: equal brackets, no edge band."""
    return bool(a["largest_stable_lr"] == b["largest_stable_lr"]
                and a["smallest_always_diverged_lr"] == b["smallest_always_diverged_lr"]
                and a["edge_lrs"] == 0 and b["edge_lrs"] == 0)


def bracket_text(row: pd.Series) -> str:
    """A bracket for a findings table: "[0.3, 3]", "[< 0.01, 0.03]" (even the smallest lr tried
    diverged sometimes), "[10, > 10]" (no lr of the grid always diverged)."""
    low, high = row["largest_stable_lr"], row["smallest_always_diverged_lr"]
    low_text = f"< {row['smallest_lr_tried']:g}" if np.isnan(low) else f"{low:g}"
    high_text = f"> {row['largest_lr_tried']:g}" if np.isnan(high) else f"{high:g}"
    return f"[{low_text}, {high_text}]"


def lr_text(value: float, censored: bool = False) -> str:
    """An lr limit for a findings table: '>= 3' when censored, 'no lr of the grid' when NaN."""
    if np.isnan(value):
        return "no lr of the grid"
    return f">= {value:g}" if censored else f"{value:g}"
