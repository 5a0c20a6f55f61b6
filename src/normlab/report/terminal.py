"""Terminal output: the summary table of `normlab show`, the dry-run plan, the progress display.

The progress display redraws one status line on a terminal and, when stderr is not a terminal
(CI, a log file), prints plain lines instead: one per finished run, and a progress line for the
current run at most every `interval_s` seconds.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import pandas as pd

from normlab.report.columns import varying_settings
from normlab.result import RunResult
from normlab.runner import ProgressReporter
from normlab.spec import RunSpec

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
    """`normlab show`: run id, the settings that vary, status, steps, test accuracy, divergence."""
    if runs.empty:
        return "No runs."
    columns = ["run_id", *varying_settings(runs), "status", "steps_done", "test_acc",
               "diverged_step"]
    return format_table(runs, columns) + "\n\n" + status_counts(runs["status"])


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


class TerminalProgress(ProgressReporter):
    """Progress of a study (runs done/total, skipped) and of the current run, on `stream`."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 30.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self.study = ""
        self.total = self.skipped = self.done = 0
        self._last_print = -math.inf

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def study_start(self, study: str, total: int, skipped: int) -> None:
        self.study, self.total, self.skipped, self.done = study, total, skipped, 0
        self._write(f"{study}: {total} runs, {skipped} already done (skipped), "
                    f"{total - skipped} to run\n")

    def run_progress(self, run_id: str, fraction: float, message: str) -> None:
        line = (f"[{self.skipped + self.done + 1}/{self.total}] {run_id} "
                f"{_bar(fraction)} {100 * fraction:3.0f}% {message}")
        if self.tty:
            self._write("\r\033[K" + line)
        elif time.monotonic() - self._last_print >= self.interval_s:
            self._last_print = time.monotonic()
            self._write(line + "\n")

    def run_end(self, spec: RunSpec, result: RunResult, done: int, total: int) -> None:
        self.done = done
        detail = _result_detail(result)
        line = (f"[{self.skipped + done}/{self.total}] {spec.run_id} {result.status} "
                f"({result.wall_time_s:.1f} s){detail}")
        self._write(("\r\033[K" if self.tty else "") + line + "\n")
        self._last_print = -math.inf


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _bar(fraction: float, width: int = 20) -> str:
    filled = round(width * min(max(fraction, 0.0), 1.0))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _result_detail(result: RunResult) -> str:
    if result.status == "diverged":
        return f" at step {result.diverged_step}, loss {format_value(result.diverged_loss)}"
    if result.status == "failed":
        first_line = (result.error or "").splitlines()[:1]
        return f": {first_line[0]}" if first_line else ""
    if "test_acc" in result.final:
        return f" test_acc={format_value(result.final['test_acc'])}"
    return ""
