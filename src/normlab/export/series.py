"""What a study exports to a tracking tool, as plain numbers, whatever the tool.

- *Scalar series* of a run: every number of its metric rows (metrics.jsonl), tagged
  `train/<key>` for the per-step rows (the mini-batch in train mode, before update s + 1) and
  `<kind>/<key>` for rows of a kind (`eval/test_acc`, `eval/train_loss`: the epoch average);
  and every probe record series (records.jsonl) with one `value` per step, tagged
  `<probe>/<quantity>/<layer>/...` (e.g. `sharpness/lambda_max`, `sharpness/two_over_lr`). A
  probe whose records hold several values per step and tag (a histogram, Ritz nodes) is no
  scalar series and is left out, named in `RunSeries.skipped`.
- *Hyperparameters*: the settings that vary across the study (`report.columns.varying_settings`).
- *Final metrics* of a run: its numeric final metrics (test_acc, test_loss, ...), `status` as a
  number (`STATUS_CODES`), `diverged_step` and its point's `p_diverge` (`load_results`).

A number stored as null (a non-finite value: strict JSON has no NaN or inf) becomes NaN, so
the step is kept; a final metric that is null or absent (no accuracy for a diverged run) is left
out. Booleans and strings are no scalars (`step` and `epoch` are axes, not series).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from normlab.report.columns import KEY_METRICS, metric_columns, varying_settings
from normlab.report.terminal import LABEL_FIRST

# status -> the number the final metric "status" takes (unfinished runs are not exported).
STATUS_CODES = {"completed": 0, "diverged": 1, "failed": 2}

# The record fields that name a series, in the order they appear in its tag.
SERIES_KEYS = ("quantity", "layer", "channel", "gradient", "mode")

_AXES = ("step", "epoch", "kind")
_NOT_RESULTS = ("pack_size",)  # how a run was computed, not what it found

Series = dict[str, list[tuple[int, float]]]  # tag -> [(step, value)] in step order


@dataclass
class RunSeries:
    """The scalar series of one run, and the probes left out (name -> why)."""

    scalars: Series = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    """`value` as a float when it is a number (null: NaN); None when it is no number."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def metric_series(rows: Iterable[Mapping[str, Any]]) -> Series:
    """tag -> [(step, value)] of every number in `rows` (metric rows, as in metrics.jsonl)."""
    series: Series = defaultdict(list)
    for row in rows:
        kind = row.get("kind") or "train"
        for key, value in row.items():
            number = None if key in _AXES else _number(value)
            if number is not None:
                series[f"{kind}/{key}"].append((int(row["step"]), number))
    return dict(series)


def record_series(records: Iterable[Mapping[str, Any]]) -> RunSeries:
    """The probe records (as in records.jsonl) that form scalar series: one numeric `value` per
    step and tag; every other probe is named in `skipped` with the reason."""
    by_probe: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_probe[str(record.get("probe"))].append(record)
    out = RunSeries()
    for probe, rows in by_probe.items():
        series: Series = defaultdict(list)
        seen: set[tuple[str, int]] = set()
        for row in rows:
            number = _number(row.get("value", "")) if "step" in row else None
            if number is None:
                continue
            tag = "/".join([probe, *(str(row[k]) for k in SERIES_KEYS if k in row)])
            key = (tag, int(row["step"]))
            if key in seen:
                out.skipped[probe] = (f"several values per step for {tag!r}: not a scalar "
                                      "series")
                break
            seen.add(key)
            series[tag].append((key[1], number))
        else:
            if series:
                out.scalars.update(series)
            else:
                out.skipped[probe] = "no record with a numeric 'value' and a 'step'"
    return out


def whole_model_charts(tags: Iterable[str]) -> dict[str, list[str]]:
    """probe -> its tags, for each probe of `tags` (probe record series) whose every series is
    of the whole model (`<probe>/<quantity>`: no layer, channel, ...), drawn in one chart: the
    sharpness beside 2/lr and 2(1 + momentum)/lr."""
    by_probe: dict[str, list[str]] = defaultdict(list)
    for tag in sorted(tags):
        by_probe[tag.split("/", 1)[0]].append(tag)
    return {probe: group for probe, group in by_probe.items()
            if all(tag.count("/") == 1 for tag in group)}


def hyperparameters(runs: pd.DataFrame) -> list[str]:
    """The settings that vary across `runs` (a `load_results` table), the usual ones first."""
    rank = {name: i for i, name in enumerate(LABEL_FIRST)}
    return sorted(varying_settings(runs), key=lambda c: (rank.get(c, len(rank)), c))


def final_metric_names(runs: pd.DataFrame) -> list[str]:
    """The final metrics of `runs` as series names: `final/<column>` for each numeric final
    metric (KEY_METRICS first), then `final/status`, `final/diverged_step`, `final/p_diverge`."""
    numeric = [c for c in metric_columns(runs) if c not in (*_NOT_RESULTS, "p_diverge")
               and pd.api.types.is_numeric_dtype(runs[c])
               and not pd.api.types.is_bool_dtype(runs[c])]
    ordered = [c for c in KEY_METRICS if c in numeric] + sorted(set(numeric) - set(KEY_METRICS))
    return [f"final/{c}" for c in (*ordered, "status", "diverged_step", "p_diverge")]


def final_metrics(run: Mapping[str, Any], names: Iterable[str]) -> dict[str, float]:
    """name -> value of the final metrics `names` of one row of the runs table; null or absent
    values are left out."""
    out = {}
    for name in names:
        column = name.removeprefix("final/")
        value = STATUS_CODES[run["status"]] if column == "status" else run.get(column)
        number = None if _missing(_plain(value)) else _number(_plain(value))
        if number is not None:
            out[name] = number
    return out


def setting_values(runs: pd.DataFrame, names: Iterable[str]) -> list[dict[str, Any]]:
    """Per row of `runs`: name -> value of the settings `names`, one type per setting (bool when
    every value is, else float when every value is a number, else str); missing values are left
    out."""
    out: list[dict[str, Any]] = [{} for _ in range(len(runs))]
    for name in names:
        values = [_plain(v) for v in runs[name]]
        present = [v for v in values if not _missing(v)]
        if all(isinstance(v, bool) for v in present):
            cast: Any = bool
        elif all(_number(v) is not None for v in present):
            cast = float
        else:
            cast = str
        for row, value in zip(out, values, strict=True):
            if not _missing(value):
                row[name] = cast(value)
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python scalar it holds."""
    return value.item() if hasattr(value, "item") else value
