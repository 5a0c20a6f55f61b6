"""`export_mlflow(study_dir, tracking_uri)`: a study folder sent to an MLflow tracking server,
after the fact (docs/tracking.md).

- One MLflow *experiment* per study folder, named `normlab <study> (<scale>): <folder>` (the
  folder's absolute path, so two folders of one study never mix).
- One *parent run* for the study (tag `normlab.role` = "study"): study.json, report.html and
  the figures as artifacts; the study's settings as tags.
- One *nested run* per finished normlab run (tag `normlab.role` = "run", `normlab.run_id`):
  params: every spec setting, flattened as the runs table (`options.steps`, lists as JSON),
    a value longer than MLflow's limit (`PARAM_VALUE_LIMIT` characters) cut and named in the
    tag `normlab.truncated_params` (spec.json, an artifact, keeps it whole);
  metrics: every number of every metrics.jsonl row at its step, `train/<key>` for the
    per-step rows and `<kind>/<key>` for rows of a kind (`eval/test_acc`), a null (a
    non-finite value) as NaN; the final metrics as `final/<key>` at the run's last step;
  tags: status, run id, pack size, device, normlab version, diverged step, p(diverge) and
    edge of its point (`normlab.studies.load_results`), the error of a failed run;
  artifacts: the run folder's files (spec.json, metrics.jsonl, records.jsonl, result.json).
  A diverged run is a result: its MLflow status is FINISHED (FAILED only for status "failed").

Exporting again never duplicates a run. Each nested run carries the hash of its result.json
(`normlab.result_sha256`), set last, once everything else is written: a run exported whole
from the same result is kept, with only the tags its study changed since set again (the
p(diverge) and edge of its point, the parent); a run without it (an export cut short) or with
another (the run was redone) is deleted and written again; a run the folder no longer holds
finished is deleted. Unfinished runs are left out until they finish. normlab's own folder is
only read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from normlab.export.series import metric_series
from normlab.report.terminal import run_labels
from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore, read_json, read_jsonl
from normlab.runs.verify import DamagedStoreError, verify_store
from normlab.studies.base import _spec_columns, load_results
from normlab.utils.config import ConfigError
from normlab.utils.optional import import_extra

# MLflow's limits (mlflow.utils.validation): characters of a param and a tag value; entries
# of one log_batch request.
PARAM_VALUE_LIMIT = 6000
TAG_VALUE_LIMIT = 8000
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100

ROLE_TAG = "normlab.role"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what MLflow's UI opens the experiment as
MODEL_TRAINING = "custom_model_development"  # the runs table, not MLflow 3's GenAI overview
RUN_ID_TAG = "normlab.run_id"
COMPLETE_TAG = "normlab.result_sha256"  # set last: the run was exported whole from this result
PARENT_TAG = "mlflow.parentRunId"
_KEY_CHARACTERS = re.compile(r"[^\w./\- :]")  # what MLflow refuses in a param name
MLFLOW_STATUS = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED"}


class TrackingServerError(ConnectionError):
    """No MLflow server answers at the URI, or it stopped answering during an export.

    A ConnectionError (an OSError), so that `normlab` prints its message and exits with 1."""


@dataclass(frozen=True)
class MlflowExport:
    """What an export did, by normlab run id: runs `created`, `replaced` (an earlier export cut
    short, or of an older result), `unchanged` (already there whole), `removed` (the folder no
    longer holds them finished); `unfinished` runs left out; params cut to MLflow's limit."""

    tracking_uri: str
    experiment_name: str
    experiment_id: str
    parent_run_id: str
    created: tuple[str, ...]
    replaced: tuple[str, ...]
    unchanged: tuple[str, ...]
    removed: tuple[str, ...]
    unfinished: tuple[str, ...]
    truncated_params: tuple[str, ...]
    report: bool

    def summary(self) -> str:
        lines = [f"exported to MLflow at {self.tracking_uri}, experiment "
                 f"{self.experiment_name!r} (id {self.experiment_id}): "
                 f"{len(self.created)} run(s) new, {len(self.replaced)} replaced, "
                 f"{len(self.unchanged)} already there, {len(self.removed)} removed."]
        if self.unfinished:
            lines.append(f"{len(self.unfinished)} unfinished run(s) left out: export again "
                         "once they finish.")
        if not self.report:
            lines.append("no report.html yet: `normlab report DIR` writes it.")
        if self.truncated_params:
            lines.append(f"params cut to MLflow's {PARAM_VALUE_LIMIT} characters (whole in "
                         f"each run's spec.json artifact): {', '.join(self.truncated_params)}.")
        return "\n".join(lines)


def export_mlflow(study_dir: str | Path, tracking_uri: str,
                  timeout_s: float = 10.0) -> MlflowExport:
    """Export the study folder `study_dir` to the MLflow tracking server at `tracking_uri`.

    Refused before anything is written, in this order: a URI that is no http(s) address and a
    folder that is no study folder or holds no run (one ConfigError naming both); damaged run
    files (DamagedStoreError naming each); mlflow not installed (ConfigError naming the extra);
    a server that does not answer within `timeout_s` seconds (TrackingServerError naming the
    URI). A server lost during the export is a TrackingServerError too: normlab's folder is
    untouched, and exporting again completes the export. Each request waits at most
    `timeout_s` and is retried twice, unless the environment sets MLFLOW_HTTP_REQUEST_TIMEOUT
    or MLFLOW_HTTP_REQUEST_MAX_RETRIES.
    """
    study_dir = Path(study_dir)
    plan = _checked_study(study_dir, tracking_uri)
    runs = load_results(study_dir)
    # imported on use: optional dependency (the normlab[mlflow] extra)
    tracking = import_extra("mlflow.tracking", "mlflow", setting="--to")
    entities = import_extra("mlflow.entities", "mlflow", setting="--to")
    exceptions = import_extra("mlflow.exceptions", "mlflow", setting="--to")
    requests = import_extra("requests", "mlflow", setting="--to")  # mlflow's HTTP client
    check_server(tracking_uri, timeout_s)
    exporter = Exporter(tracking.MlflowClient(tracking_uri=tracking_uri), entities, study_dir)
    try:
        with http_settings(timeout_s):
            return exporter.export(plan, runs, tracking_uri)
    except (exceptions.MlflowException, requests.RequestException) as err:
        raise TrackingServerError(
            f"The MLflow server at {tracking_uri} failed during the export ({exporter.done} of "
            f"the study's finished runs there whole): {err}. {study_dir} is untouched; export "
            "again once the server answers (runs written whole are kept, the others are "
            "written again)."
        ) from err


def experiment_name(plan: Mapping[str, Any], study_dir: Path) -> str:
    """`normlab lr-sweep (smoke): /abs/path/of/the/folder`."""
    return f"normlab {plan['study']} ({plan['scale']}): {study_dir.resolve()}"


def run_params(spec: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """A spec (as spec.json) as MLflow params: name -> text, and the names whose text was cut.

    Names are the runs table's columns (`options.steps`; characters MLflow refuses become
    "_"); strings as they are, anything else as JSON; longer than PARAM_VALUE_LIMIT: cut."""
    params, cut = {}, []
    for name, value in _spec_columns(dict(spec)).items():
        text = value if isinstance(value, str) else json.dumps(value)
        key = _KEY_CHARACTERS.sub("_", name)
        if len(text) > PARAM_VALUE_LIMIT:
            text = text[:PARAM_VALUE_LIMIT]
            cut.append(key)
        params[key] = text
    return params, cut


def run_metrics(rows: list[Mapping[str, Any]]) -> list[tuple[str, int, float]]:
    """(name, step, value) of every number of metric rows (as metrics.jsonl), named as in
    TensorBoard (`normlab.export.series.metric_series`: `train/<key>` for per-step rows,
    `<kind>/<key>` for rows of a kind; null is NaN), series by series."""
    return [(name, step, value) for name, points in metric_series(rows).items()
            for step, value in points]


def run_tags(row: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, str]:
    """The tags of a run's MLflow run, from its row of `load_results` and its result.json."""
    tags = {ROLE_TAG: "run", RUN_ID_TAG: str(row["run_id"]), "normlab.status": row["status"],
            "normlab.version": str(result.get("provenance", {}).get("normlab_version", ""))}
    for column in ("pack_size", "device", "diverged_step", "p_diverge", "edge"):
        value = row.get(column)
        if value is not None and not pd.isna(value):
            tags[f"normlab.{column}"] = _plain(value)
    if result.get("error"):
        tags["normlab.error"] = str(result["error"])[:TAG_VALUE_LIMIT]
    return tags


def _plain(value: Any) -> str:
    """A table cell as tag text: 3 not 3.0 for whole-number steps and sizes, true/false."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _checked_study(study_dir: Path, tracking_uri: str) -> dict[str, Any]:
    """study.json of `study_dir`, once the URI and the folder pass every check."""
    problems = []
    if not isinstance(tracking_uri, str) or not re.match(r"https?://[^/]", tracking_uri):
        problems.append(f"The MLflow tracking URI must be the http:// or https:// address of a "
                        f"tracking server (start one with `mlflow server`); got {tracking_uri!r}.")
    if not (study_dir / "study.json").is_file():
        what = "it has no study.json" if study_dir.is_dir() else "it is not a folder"
        problems.append(f"{study_dir} is not a study folder: {what}. Run `normlab run STUDY "
                        "--out DIR` first.")
    elif not any(RunStore(study_dir).run_dirs()):
        problems.append(f"{study_dir} holds no run to export.")
    if problems:
        raise ConfigError(problems)
    damages = verify_store(study_dir)
    if damages:
        raise DamagedStoreError(damages, "`normlab run STUDY --out DIR` moves the damaged runs "
                                         "to DIR/damaged/ and redoes them.")
    return read_json(study_dir / "study.json")


def check_server(tracking_uri: str, timeout_s: float) -> None:
    """TrackingServerError naming `tracking_uri` when nothing answers there within `timeout_s`.

    Any HTTP answer counts (a server that wants a login answers 401: MLflow's client sends the
    credentials of the environment); no connection or no answer in time does not."""
    url = tracking_uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingServerError(f"No MLflow tracking server answers at {tracking_uri} (within "
                           f"{timeout_s:g} s: {reason}); start one with `mlflow server "
                           "--host HOST --port PORT`, or check the address.") from err


@contextlib.contextmanager
def http_settings(timeout_s: float) -> Iterator[None]:
    """MLflow's request timeout and retries for the export (its defaults retry a lost server for
    minutes), and no "View run" line printed per run, unless the environment sets them; the
    environment is restored after."""
    settings = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout_s))),
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # not a line per run
    added = [name for name in settings if name not in os.environ]
    os.environ.update({name: settings[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def create_run(client: Any, entities: Any, experiment_id: str, parent: str | None,
               spec: Mapping[str, Any], label: str, tags: Mapping[str, str],
               start_ms: int) -> tuple[str, list[str]]:
    """A new MLflow run of one normlab run (nested under `parent` when given), with its spec as
    params; its MLflow id and the params cut to MLflow's limit."""
    params, cut = run_params(spec)
    tags = dict(tags)
    if cut:
        tags["normlab.truncated_params"] = ",".join(cut)[:TAG_VALUE_LIMIT]
    if parent is not None:
        tags[PARENT_TAG] = parent
    mlflow_id = client.create_run(experiment_id, start_time=start_ms, run_name=label,
                                  tags=tags).info.run_id
    for chunk in _chunks(list(params.items()), PARAMS_PER_BATCH):
        client.log_batch(mlflow_id, params=[entities.Param(k, v) for k, v in chunk])
    return mlflow_id, cut


def log_metrics(client: Any, entities: Any, mlflow_id: str,
                metrics: list[tuple[str, int, float]], timestamp_ms: int) -> None:
    """(name, step, value) metrics (`run_metrics`) into the MLflow run, in batches."""
    for chunk in _chunks(metrics, METRICS_PER_BATCH):
        client.log_batch(mlflow_id, metrics=[
            entities.Metric(key, value, timestamp_ms, step) for key, step, value in chunk])


def finish_run(client: Any, entities: Any, mlflow_id: str, run_dir: Path,
               result: Mapping[str, Any], last_step: int, end_ms: int, digest: str,
               tags: Mapping[str, str] | None = None) -> None:
    """End the MLflow run of a finished normlab run (`finish_steps`, one after the other)."""
    for step in finish_steps(client, entities, mlflow_id, run_dir, result, last_step, end_ms,
                             digest, tags):
        step()


def finish_steps(client: Any, entities: Any, mlflow_id: str, run_dir: Path,
                 result: Mapping[str, Any], last_step: int, end_ms: int, digest: str,
                 tags: Mapping[str, str] | None = None,
                 metrics: Sequence[tuple[str, int, float]] = ()) -> list[Callable[[], None]]:
    """The requests that end the MLflow run of a finished normlab run, in order: `metrics` not
    sent yet with its final metrics (`final/<key>` at `last_step`); the run folder's files as
    artifacts; its status; and last `tags` with the complete tag (`digest`, the sha256 of
    result.json), which says it is there whole. Each is done once even when a later one fails
    and is tried again."""
    final = [(f"final/{key}", last_step, float(value))
             for key, value in result.get("final", {}).items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)]
    tags = {**(tags or {}), COMPLETE_TAG: digest}
    return [partial(log_metrics, client, entities, mlflow_id, [*metrics, *final], end_ms),
            partial(client.log_artifacts, mlflow_id, str(run_dir)),
            partial(client.set_terminated, mlflow_id, MLFLOW_STATUS[result["status"]],
                    end_time=end_ms),
            partial(client.log_batch, mlflow_id,
                    tags=[entities.RunTag(k, v) for k, v in tags.items()])]


class Exporter:
    """The requests of one export, through one MlflowClient."""

    def __init__(self, client: Any, entities: Any, study_dir: Path) -> None:
        self.client = client
        self.entities = entities
        self.study_dir = study_dir
        self.store = RunStore(study_dir)
        self.done = 0  # runs written whole or found whole so far (for the error message)

    def export(self, plan: Mapping[str, Any], runs: pd.DataFrame,
               tracking_uri: str) -> MlflowExport:
        name = experiment_name(plan, self.study_dir)
        experiment_id = self.experiment(name, plan)
        parent = self.parent_run(experiment_id, plan)
        finished = runs[runs["status"] != "unfinished"]
        exported = self._exported_runs(experiment_id)
        labels = run_labels([RunSpec.from_dict(read_json(self.store.runs_dir / r / "spec.json"))
                             for r in finished["run_id"]])
        created, replaced, unchanged, truncated = [], [], [], set()
        for _, row in finished.iterrows():
            run_id = str(row["run_id"])
            digest = sha256_of(self.store.runs_dir / run_id / "result.json")
            earlier = exported.pop(run_id, [])
            if len(earlier) == 1 and earlier[0].data.tags.get(COMPLETE_TAG) == digest:
                self._update_tags(earlier[0], row, parent)
                unchanged.append(run_id)
            else:
                for run in earlier:
                    self.client.delete_run(run.info.run_id)
                truncated.update(self._write_run(experiment_id, parent, row, labels[run_id],
                                                 digest))
                (replaced if earlier else created).append(run_id)
            self.done += 1
        removed = sorted(exported)  # exported before, no longer a finished run of the folder
        for run in (r for gone in exported.values() for r in gone):
            self.client.delete_run(run.info.run_id)
        report = self._write_study_artifacts(parent, len(finished))
        return MlflowExport(tracking_uri, name, experiment_id, parent, tuple(created),
                            tuple(replaced), tuple(unchanged), tuple(removed),
                            tuple(runs.loc[runs["status"] == "unfinished", "run_id"]),
                            tuple(sorted(truncated)), report)

    def experiment(self, name: str, plan: Mapping[str, Any]) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, tags={
                "normlab.study": str(plan["study"]), "normlab.scale": str(plan["scale"]),
                "normlab.study_dir": str(self.study_dir.resolve()),
                EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        if experiment.lifecycle_stage != "active":
            raise ConfigError(f"The MLflow experiment {name!r} (id {experiment.experiment_id}) "
                              "is deleted: restore it (`mlflow experiments restore "
                              f"--experiment-id {experiment.experiment_id}`) or delete it for "
                              "good (`mlflow gc`) before exporting again.")
        return experiment.experiment_id

    def search(self, experiment_id: str, role: str, where: str = "") -> list[Any]:
        """Every active run of the experiment with tag normlab.role = `role` (and the filter
        `where`, e.g. on the run id tag), page by page."""
        query = f"tags.`{ROLE_TAG}` = '{role}'" + (f" and {where}" if where else "")
        found, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], query, max_results=1000,
                                           page_token=token)
            found += list(page)
            token = page.token
            if not token:
                return found

    def parent_run(self, experiment_id: str, plan: Mapping[str, Any]) -> str:
        """The study's run: found by its role tag, else created."""
        earlier = self.search(experiment_id, "study")
        if earlier:
            return earlier[0].info.run_id
        tags = {ROLE_TAG: "study", "normlab.study": str(plan["study"]),
                "normlab.scale": str(plan["scale"]), "normlab.data": str(plan.get("data")),
                "normlab.overrides": json.dumps(plan.get("overrides", {}))[:TAG_VALUE_LIMIT],
                "normlab.study_dir": str(self.study_dir.resolve())}
        return self.client.create_run(experiment_id, tags=tags,
                                      run_name=f"{plan['study']} ({plan['scale']})").info.run_id

    def _exported_runs(self, experiment_id: str) -> dict[str, list[Any]]:
        """normlab run id -> its MLflow runs in the experiment (one, unless an export raced)."""
        by_id: dict[str, list[Any]] = {}
        for run in self.search(experiment_id, "run"):
            by_id.setdefault(run.data.tags.get(RUN_ID_TAG, ""), []).append(run)
        return by_id

    def _write_run(self, experiment_id: str, parent: str, row: pd.Series, label: str,
                   digest: str) -> list[str]:
        """One normlab run as a nested MLflow run, marked whole last; the params it cut."""
        run_dir = self.store.runs_dir / str(row["run_id"])
        result = read_json(run_dir / "result.json")
        start_ms = int((run_dir / "spec.json").stat().st_mtime * 1000)
        end_ms = int((run_dir / "result.json").stat().st_mtime * 1000)
        mlflow_id, cut = create_run(self.client, self.entities, experiment_id, parent,
                                    read_json(run_dir / "spec.json"), label,
                                    run_tags(row, result), start_ms)
        log_metrics(self.client, self.entities, mlflow_id,
                    run_metrics(read_jsonl(run_dir / "metrics.jsonl")), start_ms)
        last_step = int(row["steps_done"]) if not pd.isna(row["steps_done"]) else 0
        finish_run(self.client, self.entities, mlflow_id, run_dir, result, last_step, end_ms,
                   digest)
        return cut

    def _update_tags(self, run: Any, row: pd.Series, parent: str) -> None:
        """Set the tags of a run exported whole earlier that its study changed since: the
        p(diverge) and edge of its point (more replicates), the study's run as parent."""
        result = read_json(self.store.runs_dir / str(row["run_id"]) / "result.json")
        wanted = {**run_tags(row, result), PARENT_TAG: parent}
        changed = {k: v for k, v in wanted.items() if run.data.tags.get(k) != v}
        if changed:
            self.client.log_batch(run.info.run_id, tags=[self.entities.RunTag(k, v)
                                                         for k, v in changed.items()])

    def _write_study_artifacts(self, parent: str, runs: int) -> bool:
        """study.json, report.html and the figures in the study's run; whether a report was
        there."""
        self.client.log_artifact(parent, str(self.study_dir / "study.json"))
        report = self.study_dir / "report.html"
        if report.is_file():
            self.client.log_artifact(parent, str(report))
        figures = self.study_dir / "figures"
        if figures.is_dir():
            self.client.log_artifacts(parent, str(figures), artifact_path="figures")
        self.client.set_tag(parent, "normlab.runs", str(runs))
        self.client.set_terminated(parent, "FINISHED")
        return report.is_file()
