"""Live copies of runs for tracking tools: what a worker hands each row to as it is stored.

A `LiveLog` (normlab.export.live builds them for `normlab run --log-to`) travels with the runs
to wherever they execute, in the executor's worker processes included, and opens one
`RunStream` per run there. The run's `RunContext` hands the stream each metric row and probe
record after writing it to the run folder, and the executor closes it once result.json is
stored. The run folder stays the record: a stream may lag, lose its tool or be cut short, and
the run is not affected (its calls must neither block nor raise).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Protocol

from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec


class RunStream(Protocol):
    """One run's rows on their way to a tracking tool."""

    def metrics(self, rows: list[dict[str, Any]]) -> None:
        """Metric rows, as appended to metrics.jsonl."""

    def records(self, rows: list[dict[str, Any]]) -> None:
        """Probe records, as appended to records.jsonl."""

    def close(self, result: RunResult | None) -> None:
        """The run ended with `result` (stored as result.json), or stopped without one (None:
        interrupted, or its lease taken over)."""


class LiveLog(Protocol):
    """Opens the stream of each run it is handed (picklable: it goes to worker processes)."""

    def open(self, spec: RunSpec, run_dir: Path) -> RunStream: ...

    def wait(self) -> None:
        """Wait until this process has sent what its runs logged (bounded): a worker whose
        process lives on after its run (a SLURM or Ray task) calls it before it reports."""


def open_stream(live: LiveLog | None, spec: RunSpec, run_dir: Path) -> RunStream | None:
    """`live.open(spec, run_dir)`; None without `live`, or when opening fails (said on stderr:
    the run goes on without its live copy, and the study's closing export still writes it)."""
    if live is None:
        return None
    try:
        return live.open(spec, run_dir)
    except Exception as err:  # a run never fails for its copy in a tracking tool
        print(f"normlab: run {spec.run_id} is not streamed to its tracking tool "
              f"({type(err).__name__}: {err}); it runs on, and its folder keeps everything.\n"
              + traceback.format_exc(limit=3), file=sys.stderr, flush=True)
        return None
