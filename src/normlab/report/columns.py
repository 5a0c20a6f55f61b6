"""Which columns of a results table are settings, which settings vary, and which are metrics.

The tables here are `load_results` frames (one row per run): run_id, every RunSpec setting
(mapping settings flattened as "options.key"), the result's bookkeeping (status, steps,
divergence, wall time, error) and the final metrics the task reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore, read_result
from normlab.studies.base import _spec_columns

SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec))
MAPPING_PREFIXES = ("data_options.", "norm_options.", "options.")
RESULT_COLUMNS = ("status", "steps_done", "diverged_step", "diverged_loss", "wall_time_s", "error")
KEY_METRICS = ("test_acc", "train_acc", "test_loss", "train_loss")  # shown first among metrics


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """The columns that hold spec settings, in the order RunSpec declares them."""
    columns = [c for c in runs.columns if c not in RESULT_COLUMNS
               and (c in SPEC_FIELDS or c.startswith(MAPPING_PREFIXES))]
    return sorted(columns, key=lambda c: (SPEC_FIELDS.index(c.split(".")[0]), c))


def varying_settings(runs: pd.DataFrame) -> list[str]:
    """The settings that take more than one value across the runs (missing counts as a value)."""
    return [c for c in setting_columns(runs) if runs[c].astype(str).nunique() > 1]


def common_settings(runs: pd.DataFrame) -> dict[str, Any]:
    """The settings every run shares, with their value."""
    varying = set(varying_settings(runs))
    if runs.empty:
        return {}
    return {c: runs[c].iloc[0] for c in setting_columns(runs) if c not in varying}


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The final metrics reported by the runs (every column that is no setting or bookkeeping)."""
    skip = {"run_id", *RESULT_COLUMNS}
    settings = set(setting_columns(runs))
    return [c for c in runs.columns if c not in skip and c not in settings]


def plan_table(specs: Sequence[RunSpec], store: RunStore,
               damaged: Iterable[str] = ()) -> pd.DataFrame:
    """One row per planned run: run_id, its settings, and its state in `store`.

    States: "done" (completed or diverged: skipped on a re-run), "failed" (retried),
    "unfinished" (a folder without result: redone from scratch), "damaged" (run ids in
    `damaged`: set aside and redone), "to run" (no folder yet).
    """
    rows, damaged = [], set(damaged)
    for spec in specs:
        result_path = store.run_dir(spec) / "result.json"
        if spec.run_id in damaged:
            state = "damaged"
        elif result_path.exists():
            status = read_result(result_path).status
            state = "failed" if status == "failed" else "done"
        else:
            state = "unfinished" if store.run_dir(spec).exists() else "to run"
        rows.append({"run_id": spec.run_id, **_spec_columns(spec.to_dict()), "state": state})
    return pd.DataFrame(rows)


def in_plan_order(runs: pd.DataFrame, run_ids: Iterable[str]) -> pd.DataFrame:
    """The rows of `runs` whose run_id is in `run_ids`, in that order."""
    if runs.empty:
        return runs
    order = {run_id: i for i, run_id in enumerate(dict.fromkeys(run_ids))}
    kept = runs[runs["run_id"].isin(order)]
    return kept.sort_values("run_id", key=lambda ids: ids.map(order)).reset_index(drop=True)
