"""`--log-to tensorboard:DIR`: each run streamed into a TensorBoard log folder while it trains,
in the layout of `normlab export DIR --to tensorboard OUT` (normlab.export.tensorboard).

The process that runs the study names each planned run's folder (its varying settings and run
id) and records it in the folder's marker, so that the study's closing export, which writes
every run whole, replaces those folders instead of adding second ones. In every worker, a run
writes its HParams session start when it starts, its scalars (metric rows and probe series) as
they are logged, and its final metrics and session end when it ends, through this process's
`Sender`: the training never waits for the disk. TensorBoard shows a run while it trains; the
HParams table fills as runs start and end.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from normlab.export.sender import Sender, sender_for
from normlab.export.series import (
    final_metrics,
    hyperparameters,
    metric_series,
    record_series,
    setting_values,
)
from normlab.export.target import exported_runs, run_folder_name, write_marker
from normlab.export.tensorboard import (
    export_tensorboard,
    session_end,
    session_start,
    tensorboardx,
    write_scalars,
)
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.studies.base import _spec_columns, result_columns

FLUSH_S = 5  # seconds between flushes of a run's event file to disk
WRITE_EVERY_S = 1.0  # a run's rows are written in one job per this many seconds


@dataclass
class TensorBoardLive:
    """The live log of one study folder into the TensorBoard folder `out_dir` (picklable)."""

    out_dir: Path
    study_dir: Path
    folders: dict[str, str] = field(default_factory=dict)  # run id -> its folder's name
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> hparams

    def start(self) -> None:
        tensorboardx("--log-to")  # the extra, checked before any run
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def plan(self, specs: Sequence[RunSpec]) -> None:
        """Name the folders of the planned runs by the settings that vary across them, and
        record them in the marker."""
        table = pd.DataFrame([_spec_columns(s.to_dict()) for s in specs])
        values = setting_values(table, hyperparameters(table))
        self.settings = {s.run_id: v for s, v in zip(specs, values, strict=True)}
        self.folders = {s.run_id: run_folder_name(s.run_id, v)
                        for s, v in zip(specs, values, strict=True)}
        write_marker(self.out_dir, self.study_dir, {**exported_runs(self.out_dir),
                                                    **self.folders})

    def sender(self) -> Sender:
        return sender_for(f"tensorboard:{self.out_dir.resolve()}", lambda: Sender(
            f"the TensorBoard folder {self.out_dir}", lambda err: False,
            f"`normlab export {self.study_dir} --to tensorboard {self.out_dir}`"))

    def open(self, spec: RunSpec, run_dir: Path) -> _TensorBoardRunStream:
        return _TensorBoardRunStream(self, spec)

    def drain(self) -> int:
        """Wait for this process's writes (see Sender.drain); the number left unsent."""
        return self.sender().drain()

    def export(self) -> str:
        """The closing export into the folder (`export_tensorboard`): what it wrote."""
        return export_tensorboard(self.study_dir, self.out_dir).summary()


class _TensorBoardRunStream:
    """One run's event file, written by the sender thread (see the module docstring)."""

    def __init__(self, live: TensorBoardLive, spec: RunSpec) -> None:
        self.tbx = tensorboardx("--log-to")
        self.folder = live.out_dir / live.folders.get(spec.run_id, f"run={spec.run_id}")
        self.settings = live.settings.get(spec.run_id, {})
        self.device = spec.device
        self.sender = live.sender()
        self.writer: Any = None
        self.lock = threading.Lock()
        self.pending: list[tuple[bool, list[dict[str, Any]]]] = []  # (metric rows?, rows)
        self.last_queued = -math.inf
        self.sender.put(self._start)

    def metrics(self, rows: list[dict[str, Any]]) -> None:
        self._keep(True, rows)

    def records(self, rows: list[dict[str, Any]]) -> None:
        self._keep(False, rows)

    def close(self, result: RunResult | None) -> None:
        self.sender.put(lambda: self._finish(result))

    def _keep(self, metrics: bool, rows: list[dict[str, Any]]) -> None:
        """Keep the rows; queue a write at most every WRITE_EVERY_S (the end writes the rest)."""
        with self.lock:
            self.pending.append((metrics, rows))
            now = time.monotonic()
            if now - self.last_queued < WRITE_EVERY_S:
                return
            self.last_queued = now
        self.sender.put(self._write)

    # -- in the sender thread ------------------------------------------------------------------

    def _start(self) -> None:
        self.writer = self.tbx.writer.FileWriter(str(self.folder), flush_secs=FLUSH_S)
        self.writer.add_summary(session_start(self.tbx, self.settings), 0)

    def _write(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        if self.writer is None:
            return
        for metrics, rows in pending:
            write_scalars(self.writer, self.tbx,
                          metric_series(rows) if metrics else record_series(rows).scalars)

    def _finish(self, result: RunResult | None) -> None:
        if self.writer is None:
            return
        try:
            self._write()
            if result is not None:
                row = result_columns(result, self.device)
                names = [f"final/{key}" for key, value in result.final.items()
                         if isinstance(value, (int, float)) and not isinstance(value, bool)]
                step = result.steps or 0
                final = final_metrics(row, [*names, "final/status", "final/diverged_step"])
                write_scalars(self.writer, self.tbx,
                              {name: [(step, value)] for name, value in final.items()})
                self.writer.add_summary(session_end(self.tbx, result.status), step)
        finally:
            self.writer.close()
