"""Executors: how a list of RunSpecs gets run. Studies never know which one is used.

An executor maps `execute_run` over specs and yields (spec, result) as runs finish (result None:
another writer holds the run, see runs/lease.py). `local`, `slurm` and `ray` implement it. A
`live` log (normlab.runs.live) goes with the runs to where they execute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

from normlab.runs.live import LiveLog
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import ProgressFn


class Executor(ABC):
    """Runs specs into a store folder; yields each (spec, result) when it finishes."""

    @abstractmethod
    def run(self, specs: Sequence[RunSpec], out_dir: Path,
            on_progress: ProgressFn | None = None, live: LiveLog | None = None
            ) -> Iterator[tuple[RunSpec, RunResult | None]]:
        ...
