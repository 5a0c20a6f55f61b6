"""Tasks: what a run does. `train` is one; studies register measurement tasks beside it.

A task is a function `task(spec, context) -> RunResult`. It is pure in the sense that everything
it needs is in the spec; it reports through the `RunContext` (metric rows, probe records,
progress), which writes them to the run folder as they arrive.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.runs.lease import Lease, claimed
from normlab.runs.live import LiveLog, RunStream, open_stream
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore, append_jsonl
from normlab.runs.task_registry import (  # noqa: F401 (the public names of normlab.runs.tasks)
    Task,
    get_task,
    list_tasks,
    register_task,
    register_task_check,
    task_check,
)
from normlab.utils.config import ConfigError

ProgressFn = Callable[[str, float, str], None]  # (run_id, fraction done, message)


def task_problems(spec: RunSpec) -> list[str]:
    """The problems the declared check of `spec.task` finds (none when it declares no check)."""
    check = task_check(spec.task)
    if check is None:
        return []
    try:
        check(spec)
    except ConfigError as err:
        return err.problems
    return []


@dataclass
class RunContext:
    """The channel from a running task to its run folder (and to the progress display).

    Without a `run_dir` (a task called directly, outside a study) rows are kept in memory only.
    With a `lease`, every write first checks that the run is still this writer's. With a
    `stream` (normlab.runs.live), each row written is handed on to a tracking tool too.
    """

    run_id: str = "adhoc"
    run_dir: Path | None = None
    on_progress: ProgressFn | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    lease: Lease | None = None
    stream: RunStream | None = None

    def log_metrics(self, row: dict[str, Any]) -> None:
        """One metric row (must contain 'step'); appended to metrics.jsonl at once."""
        self.metrics.append(row)
        if self.run_dir is not None:
            self.check_lease()
            append_jsonl(self.run_dir / "metrics.jsonl", [row])
        if self.stream is not None:
            self.stream.metrics([row])

    def log_records(self, probe: str, rows: list[dict[str, Any]], **context: Any) -> None:
        """Tidy probe records; `context` (e.g. step=...) is added to each row."""
        tagged = [{"probe": probe, **context, **row} for row in rows]
        self.records.extend(tagged)
        if self.run_dir is not None:
            self.check_lease()
            append_jsonl(self.run_dir / "records.jsonl", tagged)
        if self.stream is not None:
            self.stream.records(tagged)

    def check_lease(self) -> None:
        """Raise LeaseLostError when another writer took this run over."""
        if self.lease is not None:
            self.lease.check()

    def progress(self, fraction: float, message: str = "") -> None:
        if self.on_progress is not None:
            self.on_progress(self.run_id, fraction, message)


def execute_run(spec: RunSpec, out_dir: str | Path, on_progress: ProgressFn | None = None,
                live: LiveLog | None = None) -> RunResult | None:
    """Run one spec into the store at `out_dir`: a pure function of the spec, safe in a worker.

    The run is claimed first (normlab.runs.lease): None means another writer holds it or it is
    already done, and nothing was touched. An exception inside the task is recorded as status
    "failed" (with the traceback) rather than raised, so a study goes on; KeyboardInterrupt
    propagates and leaves the run unfinished. With `live`, the run's rows also stream to a
    tracking tool (normlab.runs.live).
    """
    store = RunStore(out_dir)
    with claimed(store, spec) as lease:
        if lease is None:
            return None
        return run_claimed(spec, store, lease, on_progress, live)


def run_claimed(spec: RunSpec, store: RunStore, lease: Lease,
                on_progress: ProgressFn | None = None,
                live: LiveLog | None = None) -> RunResult | None:
    """`execute_run` for a run this writer has claimed (`lease`): begin (or resume) its folder,
    run its task, store the result; None when the lease was taken over meanwhile."""
    run_dir = store.begin(spec)
    stream = open_stream(live, spec, run_dir)
    context = RunContext(run_id=spec.run_id, run_dir=run_dir, on_progress=on_progress,
                         lease=lease, stream=stream)
    start = time.perf_counter()
    stored: RunResult | None = None
    try:
        try:
            result = get_task(spec.task)(spec, context)
        except Exception as err:  # a crashed run is recorded, never lost
            result = RunResult(status="failed", error=f"{type(err).__name__}: {err}\n"
                               + traceback.format_exc())
        if not lease.held:
            return None  # taken over while paused: the new owner writes the result
        if not result.wall_time_s:
            result.wall_time_s = time.perf_counter() - start
        store.finish(spec, result)
        stored = result
        return result
    finally:
        if stream is not None:
            stream.close(stored)
