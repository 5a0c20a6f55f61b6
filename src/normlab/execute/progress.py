"""`ProgressReporter`: the channel through which a study's progress reaches whoever shows it.
The default does nothing; the CLI's terminal display (report/terminal.py) draws it."""

from __future__ import annotations

from collections.abc import Sequence

from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec


class ProgressReporter:
    """Receives a study's progress. The default does nothing; the CLI draws a progress display."""

    def study_start(self, study: str, planned: Sequence[RunSpec],
                    todo: Sequence[RunSpec]) -> None:
        """`planned`: the study's distinct runs; `todo`: those to run now (the rest are done)."""

    def notice(self, message: str) -> None:
        """Something the user should know before the runs start (duplicates, damaged runs)."""

    def more_runs(self, planned: Sequence[RunSpec], todo: Sequence[RunSpec],
                  reason: str) -> None:
        """A further round: `planned` is the study's runs so far, `todo` those to run now."""

    def run_progress(self, run_id: str, fraction: float, message: str) -> None: ...

    def run_end(self, spec: RunSpec, result: RunResult, done: int, total: int) -> None: ...

    def study_end(self) -> None:
        """The last call, also when the study stops early (an error, Ctrl-C)."""
