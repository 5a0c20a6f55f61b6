"""Terminal output: the summary table of `normlab show`, the dry-run plan, the progress display.

The progress display draws live bars with `rich` on a terminal and, when stderr is not a terminal
(CI, a log file), prints plain lines instead: one per finished run, and a progress line for the
current run at most every `interval_s` seconds.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import numpy as np
import pandas as pd

from normlab.execute.progress import ProgressReporter
from normlab.report.columns import varying_settings
from normlab.report.eta import RATE_WINDOW_S, planned_work, recent_rate, time_left, work_done
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
            + "). On a CPU a pack gives its members the same bits at any size "
            "(normlab.train.invariance); on a GPU, or where a run took the plain loop, near a "
            "divergence frontier the pack size can flip a run's outcome (docs/training.md, "
            "'Divergence').")


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
    the elapsed time and estimated time left for the whole study, weighted by each run's planned
    work (`normlab.report.eta`).

    On a terminal, `rich` draws two live bars (the study, in work done; the current run, step by
    step), and the time left appears once, on the study's bar. Not on a terminal (CI, a SLURM
    log), plain lines: one per finished run, and one for the current run at most every
    `interval_s` seconds, each ending in the elapsed time and the time left.
    """

    def __init__(self, stream: TextIO | None = None, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.clock = clock  # seconds, for the elapsed time and the rate
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self.labels: dict[str, str] = {}
        self.study = ""
        self.total = self.skipped = self.done = 0
        self._work: dict[str, float] = {}  # run id -> planned work, of the runs to do
        self._fractions: dict[str, float] = {}  # run id -> fraction done (1: finished)
        self._samples: list[tuple[float, float]] = []  # (time, work done), for the rate
        self._start = self.clock()
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
        self._round(planned, todo)
        self._line(f"{study}: {self.total} runs, {self.skipped} already done (skipped), "
                   f"{len(todo)} to run")
        if self.tty and todo:
            self._live = _LiveBars(self.stream, study)

    def more_runs(self, planned: Sequence[RunSpec], todo: Sequence[RunSpec],
                  reason: str) -> None:
        """A further round: its runs are counted, and the time left estimated, from now on."""
        self._round(planned, todo)
        self._line(f"{self.study}: {reason}; {len(todo)} to run")
        if self._live is not None:
            self._live.restart()
        elif self.tty and todo:
            self._live = _LiveBars(self.stream, self.study)

    def _round(self, planned: Sequence[RunSpec], todo: Sequence[RunSpec]) -> None:
        self.labels = run_labels(planned)
        self.total, self.skipped, self.done = len(planned), len(planned) - len(todo), 0
        self._work = planned_works(todo)
        self._fractions = {}
        self._start = self.clock()
        self._samples = [(self._start, 0.0)]

    def run_progress(self, run_id: str, fraction: float, message: str) -> None:
        self._fractions[run_id] = fraction
        label = f"{self._counter(1)} {self.labels.get(run_id, run_id)}"
        if self._live is not None:
            self._live.update(label, message, min(max(fraction, 0.0), 1.0), *self._estimate())
        elif self.clock() - self._last_print >= self.interval_s:
            self._last_print = self.clock()
            self._line(f"{label}: {100 * fraction:.0f}% {message} | {self._times()}")

    def run_end(self, spec: RunSpec, result: RunResult, done: int, total: int) -> None:
        self.done = done
        if result.status != "completed":  # ended early: the rest of its work will not be done
            share = min(max(self._fractions.get(spec.run_id, 0.0), 0.0), 1.0)
            self._work[spec.run_id] = self._work.get(spec.run_id, 0.0) * share
        self._fractions[spec.run_id] = 1.0
        label = self.labels.get(spec.run_id, spec.run_id)
        # on a terminal the study's bar holds the time left: one estimate on the screen
        times = self._times(left=self._live is None)
        self._line(f"{self._counter(0)} {label}: {result.status} in {result.wall_time_s:.1f} s"
                   f"{_result_detail(result)} | {times}")
        if self._live is not None:
            self._live.update("", "", 0.0, *self._estimate())
        self._last_print = -math.inf

    def study_end(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _counter(self, ahead: int) -> str:
        return f"[{self.skipped + self.done + ahead}/{self.total}]"

    def _estimate(self) -> tuple[float, float | None]:
        """(the share of this round's planned work done, seconds left or None)."""
        total = sum(self._work.values())
        done, now = work_done(self._work, self._fractions), self.clock()
        if done > self._samples[-1][1]:
            self._samples.append((now, done))
            old = [i for i, (t, _) in enumerate(self._samples) if t <= now - RATE_WINDOW_S]
            self._samples = self._samples[old[-1] if old else 0:]  # what the window reads
        left = time_left(total, done, recent_rate(self._samples, now))
        return (done / total if total > 0 else 0.0), left

    def _times(self, left: bool = True) -> str:
        """"0:01:23 elapsed, about 0:04:56 left" (the left part once work has been done)."""
        text = f"{_clock(self.clock() - self._start)} elapsed"
        seconds = self._estimate()[1]
        if left and seconds:
            text += f", {left_text(seconds)}"
        return text


def planned_works(specs: Sequence[RunSpec]) -> dict[str, float]:
    """Run id -> planned work (`eta.planned_work`), the training-set sizes read once per data
    set."""
    # imported on use: execute.throughput loads the data sets (torch, 1.3 s on the 2-core CPU),
    # which `normlab show` and the CLI's start, that import this module, never need.
    from normlab.execute.throughput import data_facts

    sizes: dict = {}
    return {s.run_id: planned_work(s, data_facts(s, sizes)[0]) for s in specs}


def left_text(seconds: float) -> str:
    """"about 0:04:56 left"."""
    return f"about {_clock(seconds)} left"


class _LiveBars:
    """rich's live display: a bar for the study (the share of its planned work done, elapsed
    time and the time left, the only estimate on the screen) and one for the current run (its
    steps and its own elapsed time)."""

    def __init__(self, stream: TextIO, study: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[left]}"),
            TextColumn("{task.fields[message]}"), console=Console(file=stream),
            refresh_per_second=4)
        self.console = self.progress.console
        self.study = self.progress.add_task(study, total=1.0, message="", left="")
        self.run = self.progress.add_task("", total=1.0, message="", left="")
        self.label = ""
        self.progress.start()

    def restart(self) -> None:
        """The study bar anew, for a further round."""
        self.progress.reset(self.study, total=1.0, left="")

    def update(self, label: str, message: str, fraction: float, work_share: float,
               left: float | None) -> None:
        if label != self.label:  # a new run: its own clock
            self.label = label
            self.progress.reset(self.run)
        self.progress.update(self.run, description=label, completed=fraction, message=message)
        self.progress.update(self.study, completed=work_share,
                             left=left_text(left) if left is not None else "")

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
