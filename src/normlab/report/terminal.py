"""Terminal output: the summary table of `normlab show`, the dry-run plan, the progress display.

The progress display draws live bars with `rich` on a terminal and, when stderr is not a terminal
(CI, a log file), prints plain lines instead: one per finished run, and a progress line for the
current run at most every `interval_s` seconds.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np
import pandas as pd

from normlab.execute.progress import ProgressReporter
from normlab.report.columns import varying_settings
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.studies.base import _spec_columns

STATUS_ORDER = ("completed", "diverged", "failed", "unfinished")


def format_value(value: Any) -> str:
    """A cell: floats to 4 significant digits, missing values blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: pd.DataFrame, columns: Sequence[str], max_width: int = 40) -> str:
    """A fixed-width text table of `columns` (those missing from `rows` are left out).

    Cells longer than `max_width` characters are cut, ending in "…".
    """
    columns = [c for c in columns if c in rows.columns]
    cells = [[_cut(format_value(v), max_width) for v in row]
             for row in rows[columns].itertuples(index=False)]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in cells]
    return "\n".join(lines)


def status_counts(statuses: pd.Series) -> str:
    """E.g. "12 runs: 9 completed, 2 diverged, 1 failed"."""
    counts = statuses.value_counts()
    parts = [f"{counts[s]} {s}" for s in STATUS_ORDER if s in counts]
    parts += [f"{n} {s}" for s, n in counts.items() if s not in STATUS_ORDER]
    noun = "run" if len(statuses) == 1 else "runs"
    return f"{len(statuses)} {noun}: " + ", ".join(parts) if parts else f"0 {noun}"


def summary_table(runs: pd.DataFrame) -> str:
    """`normlab show`: run id, the settings that vary, status, steps, test accuracy, divergence,
    and for runs at an edge point (0 < p(diverge) < 1) an "edge" mark with the point's p; then
    the status counts, and a note when the runs were trained in packs of different sizes."""
    if runs.empty:
        return "No runs."
    columns = ["run_id", *varying_settings(runs), "status", "steps_done", "test_acc",
               "diverged_step"]
    lines = []
    edge = runs["edge"].fillna(False).astype(bool) if "edge" in runs else None
    if edge is not None and edge.any():
        runs = runs.assign(edge=np.where(edge, "edge", ""))
        columns += ["edge", "p_diverge"]
        lines.append(f"edge: {int(edge.sum())} run(s) at points whose runs (seeds and "
                     f"perturbation replicates) both diverged and did not, 0 < p_diverge < 1: "
                     f"their own outcome is chance.")
    note = pack_size_note(runs)
    lines += [note] if note else []
    return "\n".join([format_table(runs, columns), "", status_counts(runs["status"]), *lines])


def pack_size_note(runs: pd.DataFrame) -> str | None:
    """E.g. "note: these runs were trained in packs of different sizes (1: 4 runs, 7: 56 runs);
    ...", or None when every finished run had the same pack size (`load_results`' pack_size)."""
    sizes = runs["pack_size"].dropna() if "pack_size" in runs else pd.Series(dtype=float)
    counts = sizes.astype(int).value_counts().sort_index()
    if len(counts) < 2:
        return None
    return ("note: these runs were trained in packs of different sizes ("
            + ", ".join(f"{k}: {n} run{'s' if n > 1 else ''}" for k, n in counts.items())
            + "); near a divergence frontier that can flip a run's outcome "
            "(docs/training.md, 'Divergence').")


def plan_summary(plan: pd.DataFrame) -> str:
    """`normlab run --dry-run`: the planned runs, their settings that vary, and their state."""
    if plan.empty:
        return "The study plans no runs."
    table = format_table(plan, ["run_id", *varying_settings(plan), "state"])
    counts = plan["state"].value_counts()
    done, failed = counts.get("done", 0), counts.get("failed", 0)
    todo = len(plan) - done
    line = (f"{len(plan)} runs planned: {done} already done, {todo} to run"
            + (f" ({failed} failed, to be retried)" if failed else "") + ".")
    return table + "\n\n" + line


# The settings a sweep most often varies come first in a label, so that a label cut to its width
# keeps them; other varying settings follow in the table's order.
LABEL_FIRST = ("norm", "lr", "depth", "batch_size", "init", "seed", "weight_decay", "schedule")


def run_labels(specs: Sequence[RunSpec], width: int = 60) -> dict[str, str]:
    """Run id -> the settings that vary across `specs`, e.g. "norm=batch lr=0.1 seed=0" (the run
    id where nothing varies), `LABEL_FIRST` first, cut to `width` characters."""
    if not specs:
        return {}
    table = pd.DataFrame([_spec_columns(s.to_dict()) for s in specs])
    varying = sorted(varying_settings(table),
                     key=lambda c: LABEL_FIRST.index(c) if c in LABEL_FIRST else len(LABEL_FIRST))
    labels = {}
    for spec, (_, row) in zip(specs, table.iterrows(), strict=True):
        text = " ".join(f"{c}={format_value(row[c])}" for c in varying)
        labels[spec.run_id] = _cut(text or spec.run_id, width)
    return labels


class TerminalProgress(ProgressReporter):
    """A study's progress on `stream`: each run labelled by the settings that vary, its steps, and
    the elapsed time and estimated time left for the whole study.

    On a terminal, `rich` draws two live bars (the study; the current run, step by step). Not on a
    terminal (CI, a SLURM log), plain lines: one per finished run, and one for the current run
    at most every `interval_s` seconds.
    """

    def __init__(self, stream: TextIO | None = None, interval_s: float = 30.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self.labels: dict[str, str] = {}
        self.study = ""
        self.total = self.skipped = self.done = 0
        self._fraction = 0.0
        self._start = time.monotonic()
        self._last_print = -math.inf
        self._live: Any = None

    def _line(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def notice(self, message: str) -> None:
        self._line(f"note: {message}")

    def study_start(self, study: str, planned: Sequence[RunSpec],
                    todo: Sequence[RunSpec]) -> None:
        self.study = study
        self.labels = run_labels(planned)
        self.total, self.skipped, self.done = len(planned), len(planned) - len(todo), 0
        self._start = time.monotonic()
        self._line(f"{study}: {self.total} runs, {self.skipped} already done (skipped), "
                   f"{len(todo)} to run")
        if self.tty and todo:
            self._live = _LiveBars(self.stream, study, len(todo))

    def more_runs(self, planned: Sequence[RunSpec], todo: Sequence[RunSpec],
                  reason: str) -> None:
        """A further round: its runs are counted, and the time left estimated, from now on."""
        self.labels = run_labels(planned)
        self.total, self.skipped, self.done = len(planned), len(planned) - len(todo), 0
        self._start = time.monotonic()
        self._line(f"{self.study}: {reason}; {len(todo)} to run")
        if self._live is not None:
            self._live.restart(len(todo))
        elif self.tty and todo:
            self._live = _LiveBars(self.stream, self.study, len(todo))

    def run_progress(self, run_id: str, fraction: float, message: str) -> None:
        self._fraction = min(max(fraction, 0.0), 1.0)
        label = f"{self._counter(1)} {self.labels.get(run_id, run_id)}"
        if self._live is not None:
            self._live.update(label, message, self._fraction, self.done + self._fraction)
        elif time.monotonic() - self._last_print >= self.interval_s:
            self._last_print = time.monotonic()
            self._line(f"{label}: {100 * self._fraction:.0f}% {message} | {self._times()}")

    def run_end(self, spec: RunSpec, result: RunResult, done: int, total: int) -> None:
        self.done, self._fraction = done, 0.0
        label = self.labels.get(spec.run_id, spec.run_id)
        self._line(f"{self._counter(0)} {label}: {result.status} in {result.wall_time_s:.1f} s"
                   f"{_result_detail(result)} | {self._times()}")
        if self._live is not None:
            self._live.update("", "", 0.0, self.done)
        self._last_print = -math.inf

    def study_end(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _counter(self, ahead: int) -> str:
        return f"[{self.skipped + self.done + ahead}/{self.total}]"

    def _times(self) -> str:
        """"0:01:23 elapsed, about 0:04:56 left" (the left part once a run has progressed)."""
        elapsed = time.monotonic() - self._start
        text = f"{_clock(elapsed)} elapsed"
        runs_done = self.done + self._fraction
        todo = self.total - self.skipped
        if runs_done > 0 and todo > runs_done:
            text += f", about {_clock(elapsed / runs_done * (todo - runs_done))} left"
        return text


class _LiveBars:
    """rich's live display: a bar for the study (runs to do, with elapsed time and time left)
    and one for the current run (its steps)."""

    def __init__(self, stream: TextIO, study: str, todo: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[message]}"),
            console=Console(file=stream), refresh_per_second=4)
        self.console = self.progress.console
        self.study = self.progress.add_task(study, total=todo, message="")
        self.run = self.progress.add_task("", total=1.0, message="")
        self.label = ""
        self.progress.start()

    def restart(self, todo: int) -> None:
        """The study bar anew, for a further round of `todo` runs."""
        self.progress.reset(self.study, total=todo)

    def update(self, label: str, message: str, fraction: float, runs_done: float) -> None:
        if label != self.label:  # a new run: its own clock
            self.label = label
            self.progress.reset(self.run)
        self.progress.update(self.run, description=label, completed=fraction, message=message)
        self.progress.update(self.study, completed=runs_done)

    def stop(self) -> None:
        self.progress.stop()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _result_detail(result: RunResult) -> str:
    if result.status == "diverged":
        return f" at step {result.diverged_step}, loss {format_value(result.diverged_loss)}"
    if result.status == "failed":
        first_line = (result.error or "").splitlines()[:1]
        return f": {first_line[0]}" if first_line else ""
    if "test_acc" in result.final:
        return f" test_acc={format_value(result.final['test_acc'])}"
    return ""
