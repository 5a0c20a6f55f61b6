"""`--log-to mlflow:URI`: each run streamed to an MLflow tracking server while it trains, as
`normlab export DIR --to mlflow URI` would write it (normlab.export.mlflow).

The study's experiment and parent run are found or made once, by the process that runs the
study. In every worker, each run's MLflow run is made when the run starts (an earlier MLflow
run of the same normlab run, from an interrupted attempt, is deleted first). Its metric rows
go out as they are logged, coalesced into batches. When the run ends, its final metrics, tags
and files follow, and last the complete tag. A resumed run, a run whose rows could not all
be sent, and one that stopped without a result never get the complete tag, so the study's
closing export writes them whole. All of it goes through this process's `Sender`, so the
training never waits for the server.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from normlab.export.mlflow import (
    METRICS_PER_BATCH,
    ROLE_TAG,
    RUN_ID_TAG,
    Exporter,
    TrackingServerError,
    check_server,
    create_run,
    experiment_name,
    export_mlflow,
    finish_steps,
    http_settings,
    log_metrics,
    run_metrics,
    run_tags,
    sha256_of,
)
from normlab.export.sender import Sender, sender_for
from normlab.report.terminal import run_labels
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec
from normlab.runs.store import CHECKPOINT_FILE, read_json
from normlab.studies.base import result_columns
from normlab.utils.optional import import_extra

REQUEST_TIMEOUT_S = 5.0  # one request to the server, before the sender tries again later
METRICS_EVERY_S = 5.0  # a run's metric rows go out in one request per this many seconds


def _mlflow() -> SimpleNamespace:
    """The parts of mlflow a live log writes with (the normlab[mlflow] extra)."""
    # imported on use: optional dependency (the normlab[mlflow] extra)
    return SimpleNamespace(
        tracking=import_extra("mlflow.tracking", "mlflow", setting="--log-to"),
        entities=import_extra("mlflow.entities", "mlflow", setting="--log-to"),
        exceptions=import_extra("mlflow.exceptions", "mlflow", setting="--log-to"),
        requests=import_extra("requests", "mlflow", setting="--log-to"))


@dataclass
class MlflowLive:
    """The live log of one study folder into the server at `uri` (picklable)."""

    uri: str
    study_dir: Path
    experiment_id: str | None = None
    parent_id: str | None = None
    earlier: frozenset[str] | None = None  # run ids with MLflow runs at the start (None: unknown)
    labels: dict[str, str] = field(default_factory=dict)  # run id -> run name

    def start(self) -> None:
        """Find or make the study's experiment and parent run; when the server does not answer,
        that is said once, and the streams find the experiment themselves when it answers (the
        closing export sets their parent)."""
        mlflow = _mlflow()
        try:
            check_server(self.uri, REQUEST_TIMEOUT_S)
            with http_settings(REQUEST_TIMEOUT_S):
                exporter = Exporter(_client(self.uri), mlflow.entities, self.study_dir)
                plan = read_json(self.study_dir / "study.json")
                self.experiment_id = exporter.experiment(experiment_name(plan, self.study_dir),
                                                         plan)
                self.parent_id = exporter.parent_run(self.experiment_id, plan)
                self.earlier = frozenset(run.data.tags.get(RUN_ID_TAG, "") for run in
                                         exporter.search(self.experiment_id, "run"))
        except (TrackingServerError, mlflow.exceptions.MlflowException,
                mlflow.requests.RequestException) as err:
            self.sender().went_down(err)

    def plan(self, specs: Sequence[RunSpec]) -> None:
        """Name the MLflow runs of the planned runs by the settings that vary across them."""
        self.labels = run_labels(list(specs))

    def sender(self) -> Sender:
        return sender_for(f"mlflow:{self.uri}", lambda: Sender(
            f"the MLflow server at {self.uri}", unreachable,
            f"`normlab export {self.study_dir} --to mlflow {self.uri}`"))

    def open(self, spec: RunSpec, run_dir: Path) -> _MlflowRunStream:
        return _MlflowRunStream(self, spec, run_dir)

    def drain(self) -> int:
        """Wait for this process's writes (see Sender.drain); the number left unsent."""
        return self.sender().drain()

    def export(self) -> str:
        """The closing export to the server (`export_mlflow`): what it sent, or, when the
        server does not answer, how to send it later."""
        try:
            return export_mlflow(self.study_dir, self.uri).summary()
        except TrackingServerError as err:
            return (f"the study is not in MLflow whole ({err}); send it later with "
                    f"`normlab export {self.study_dir} --to mlflow {self.uri}`.")


def unreachable(err: Exception) -> bool:
    """Whether `err` says the server did not answer (no connection, a time-out, a server
    error: worth trying again) rather than refused the request."""
    mlflow = _mlflow()
    if isinstance(err, mlflow.requests.RequestException):
        return True
    return (isinstance(err, mlflow.exceptions.MlflowException)
            and err.get_http_status_code() >= 500)


@functools.cache
def _client(uri: str) -> Any:
    """This process's MLflow client of the server at `uri`."""
    return _mlflow().tracking.MlflowClient(tracking_uri=uri)


class _MlflowRunStream:
    """One run's MLflow run, written by the sender thread (see the module docstring)."""

    def __init__(self, live: MlflowLive, spec: RunSpec, run_dir: Path) -> None:
        self.live, self.spec, self.run_dir = live, spec, run_dir
        self.whole = not (run_dir / CHECKPOINT_FILE).exists()  # a resumed run is not
        self.mlflow = _mlflow()
        self.sender = live.sender()
        self.client: Any = None
        self.mlflow_id: str | None = None
        self.lock = threading.Lock()
        self.pending: list[tuple[str, int, float]] = []
        self.unsent: list[tuple[str, int, float]] = []
        self.queued = False
        self.last_queued = time.monotonic()  # the first rows go out after METRICS_EVERY_S
        self.closing: list[Callable[[], None]] | None = None  # the requests left to end it
        self.sender.put(self._start)

    def metrics(self, rows: list[dict[str, Any]]) -> None:
        """Keep the rows; queue a send at most every METRICS_EVERY_S (the end sends the rest)."""
        with self.lock:
            self.pending += run_metrics(rows)
            now = time.monotonic()
            if self.queued or now - self.last_queued < METRICS_EVERY_S:
                return
            self.queued, self.last_queued = True, now
        self.sender.put(self._send_metrics)

    def records(self, rows: list[dict[str, Any]]) -> None:
        """Probe records are not sent: MLflow runs hold the metric rows (as the export)."""

    def close(self, result: RunResult | None) -> None:
        self.sender.put(lambda: self._finish(result))

    # -- in the sender thread ------------------------------------------------------------------

    def _start(self) -> None:
        with http_settings(REQUEST_TIMEOUT_S):
            self.client = _client(self.live.uri)
            exporter = Exporter(self.client, self.mlflow.entities, self.live.study_dir)
            experiment_id = self.live.experiment_id
            if experiment_id is None:
                plan = read_json(self.live.study_dir / "study.json")
                experiment_id = exporter.experiment(experiment_name(plan, self.live.study_dir),
                                                    plan)
            if self.live.earlier is None or self.spec.run_id in self.live.earlier:
                for earlier in exporter.search(experiment_id, "run",
                                               f"tags.`{RUN_ID_TAG}` = '{self.spec.run_id}'"):
                    self.client.delete_run(earlier.info.run_id)
            self.mlflow_id, _ = create_run(
                self.client, self.mlflow.entities, experiment_id, self.live.parent_id,
                self.spec.to_dict(), self.live.labels.get(self.spec.run_id, self.spec.run_id),
                {ROLE_TAG: "run", RUN_ID_TAG: self.spec.run_id, "normlab.status": "running"},
                int(time.time() * 1000))

    def _send_metrics(self) -> None:
        if self.mlflow_id is None:  # the start failed for good (said by the sender)
            return
        with self.lock:
            self.unsent += self.pending
            self.pending, self.queued = [], False
        with http_settings(REQUEST_TIMEOUT_S):
            while self.unsent:  # a failure keeps what is not sent yet for the next try
                chunk = self.unsent[:METRICS_PER_BATCH]
                log_metrics(self.client, self.mlflow.entities, self.mlflow_id, chunk,
                            int(time.time() * 1000))
                del self.unsent[:len(chunk)]

    def _finish(self, result: RunResult | None) -> None:
        if self.mlflow_id is None:
            return
        with http_settings(REQUEST_TIMEOUT_S):
            if result is None or not self.whole:  # the closing export writes it whole
                self._send_metrics()
                self.client.set_terminated(self.mlflow_id, "KILLED")
                return
            if self.closing is None:
                with self.lock:  # the rows not sent yet go with the final metrics
                    rows, self.unsent, self.pending = self.unsent + self.pending, [], []
                result_file = self.run_dir / "result.json"
                stored = read_json(result_file)
                row = {"run_id": self.spec.run_id, **result_columns(result, self.spec.device)}
                self.closing = finish_steps(
                    self.client, self.mlflow.entities, self.mlflow_id, self.run_dir, stored,
                    result.steps or 0, int(time.time() * 1000), sha256_of(result_file),
                    tags=run_tags(row, stored), metrics=rows)
            while self.closing:  # a request that fails is tried again, the others not
                self.closing[0]()
                del self.closing[0]
