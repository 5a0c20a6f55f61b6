"""`normlab run ... --log-to tensorboard:DIR --log-to mlflow:URI`: a study's runs in the tracking
tools while it runs (docs/tracking.md).

`live_log(values, study_dir)` checks the targets before any run and returns a `LiveTargets`,
which the executors carry to where the runs execute (normlab.runs.live): each worker writes
its own runs, packs included, through a background sender per process
(normlab.export.sender), so a tool that is slow or down never holds a run up.

When the study ends, `LiveTargets.finish` drops what this process could not send (a tool that
does not answer), and runs the ordinary export into each target (`normlab export`), so that
what stays there is exactly what an export writes, whatever the live copies missed: the
HParams experiment and figures, each run's p(diverge) and edge, and any run that was resumed,
cut short or not sent while the tool was down. A tool still down then is said, with the
command that sends it later. The run folders are the record
throughout; nothing in them depends on a tool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.export.live_mlflow import MlflowLive
from normlab.export.live_tensorboard import TensorBoardLive
from normlab.export.target import target_problems
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.utils.config import ConfigError

LOG_TO_FORMS = "tensorboard:DIR or mlflow:URI (an http:// or https:// tracking server)"

Target = TensorBoardLive | MlflowLive


def log_to_problems(values: Sequence[str], study_dir: Path) -> list[str]:
    """What is wrong with the `--log-to` values ([] when nothing is)."""
    problems = []
    for value in values:
        kind, _, where = value.partition(":")
        if kind == "tensorboard" and where:
            problems += target_problems(Path(where), study_dir)
        elif kind == "mlflow" and re.match(r"https?://[^/]", where):
            continue
        else:
            problems.append(f"The '--log-to' setting takes {LOG_TO_FORMS}; got {value!r}.")
    return problems


@dataclass
class LiveTargets:
    """Every `--log-to` target of one study folder; opens each run's streams (a LiveLog)."""

    targets: list[Target] = field(default_factory=list)

    def plan(self, specs: Sequence[RunSpec]) -> None:
        """The runs planned so far (each round): their names in the tools."""
        for target in self.targets:
            target.plan(specs)

    def open(self, spec: RunSpec, run_dir: Path) -> _Streams:
        return _Streams([target.open(spec, run_dir) for target in self.targets])

    def wait(self) -> None:
        """Wait until this process has sent what its runs logged (a bounded wait, and none
        while a tool does not answer)."""
        for target in self.targets:
            target.drain()

    def finish(self) -> list[str]:
        """Send what this process still holds, then export the study into each target (see
        the module docstring); a line to show per target."""
        self.wait()
        lines = []
        for target in self.targets:  # what is left, the export below writes (or says it cannot)
            sender = target.sender()
            dropped = sender.cancel()
            if dropped:
                lines.append(f"{dropped} live write(s) to {sender.what} not sent (it did not "
                             "answer); the export writes the study whole instead.")
        return lines + [target.export() for target in self.targets]


class _Streams:
    """The streams of one run, one per target (a RunStream)."""

    def __init__(self, streams: list[Any]) -> None:
        self.streams = streams

    def metrics(self, rows: list[dict[str, Any]]) -> None:
        for stream in self.streams:
            stream.metrics(rows)

    def records(self, rows: list[dict[str, Any]]) -> None:
        for stream in self.streams:
            stream.records(rows)

    def close(self, result: RunResult | None) -> None:
        for stream in self.streams:
            stream.close(result)


def live_log(values: Sequence[str], study_dir: str | Path) -> LiveTargets:
    """The targets of `values` (`--log-to` settings) for the study folder `study_dir`, checked
    (ConfigError naming each problem, a missing extra included) and started: the TensorBoard
    folder made, the MLflow experiment and parent run found or made (a server that does not
    answer is said once; its runs are sent when it answers)."""
    study_dir = Path(study_dir)
    problems = log_to_problems(values, study_dir)
    if problems:
        raise ConfigError(problems)
    targets: list[Target] = []
    for value in dict.fromkeys(values):
        kind, _, where = value.partition(":")
        targets.append(TensorBoardLive(Path(where), study_dir) if kind == "tensorboard"
                       else MlflowLive(where, study_dir))
    for target in targets:
        target.start()
    return LiveTargets(targets)
