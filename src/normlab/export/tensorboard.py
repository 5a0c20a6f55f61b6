"""`export_tensorboard(study_dir, out_dir)`: a study folder as TensorBoard event files, after
the fact (`tensorboard --logdir OUT` shows them; docs/tracking.md).

The export folder holds one TensorBoard run per finished normlab run
(`<varying settings>,run=<run_id>/`: its scalar series, see `normlab.export.series`, its
hyperparameters and final metrics for the HParams dashboard) and the study's own run
(`study/`: the HParams experiment, which lists every varying setting with its values and the
final metrics; the report's figures as images; and a Custom Scalars chart per whole-model
probe, such as the sharpness beside 2/lr). Unfinished runs are left out.

Scalars are float32, the one precision TensorBoard's default loader shows (it drops float64
scalars silently): each reads back as the float32 nearest the number in metrics.jsonl, a
relative rounding of at most 6e-8 (beyond +-3.4e38: +-inf); the run folder keeps the float64.
Writing goes through tensorboardX (the `normlab[tensorboard]` extra: 0.4 MB of wheels with
protobuf, against 20 MB for the tensorboard package, which only viewing needs).
Cost: one read of every run file (as `normlab report`), and one event file per run.
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from normlab.export.series import (
    STATUS_CODES,
    RunSeries,
    Series,
    final_metric_names,
    final_metrics,
    hyperparameters,
    metric_series,
    record_series,
    setting_values,
    whole_model_charts,
)
from normlab.export.target import (
    STUDY_FOLDER,
    check_target,
    exported_runs,
    replace_folder,
    run_folder_name,
    write_marker,
)
from normlab.runs.store import RunStore, read_jsonl
from normlab.runs.verify import DamagedStoreError, verify_store
from normlab.studies.base import load_results, read_study_file
from normlab.utils.config import ConfigError
from normlab.utils.optional import import_extra

_HPARAMS = "hparams"
_EXPERIMENT_TAG = "_hparams_/experiment"
_SESSION_START_TAG = "_hparams_/session_start_info"
_SESSION_END_TAG = "_hparams_/session_end_info"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> channels (3, palette: read as RGB)


@dataclass(frozen=True)
class TensorBoardExport:
    """What an export wrote: into `out_dir`, `runs` runs and `figures` figures; `unfinished`
    runs left out (no result yet); probes that are no scalar series (name -> why)."""

    out_dir: Path
    runs: int
    unfinished: int
    figures: int
    skipped_probes: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{self.out_dir}: {self.runs} run(s) and {self.figures} figure(s) for "
                 f"TensorBoard; view them with: tensorboard --logdir {self.out_dir}"]
        if self.unfinished:
            lines.append(f"left out: {self.unfinished} unfinished run(s) (no result yet)")
        lines += [f"left out: probe {name!r}: {why}" for name, why in
                  sorted(self.skipped_probes.items())]
        return "\n".join(lines)


def export_tensorboard(study_dir: str | Path, out_dir: str | Path) -> TensorBoardExport:
    """Export the study folder `study_dir` into the TensorBoard log folder `out_dir`.

    Refused before anything is written (ConfigError): tensorboardX missing, `out_dir` not
    writable or holding anything but an earlier export of this study folder, a folder without
    runs; DamagedStoreError names each damaged file of `study_dir`. Exporting again replaces
    each run's folder (found by run id), so no run is ever there twice.
    """
    tbx = tensorboardx()
    study_dir, out_dir = Path(study_dir), Path(out_dir)
    check_target(out_dir, study_dir)
    damages = verify_store(study_dir)
    if damages:
        raise DamagedStoreError(damages, "`normlab run STUDY --out DIR` moves the damaged runs "
                                         "to DIR/damaged/ and redoes them.")
    runs = load_results(study_dir)
    if runs.empty:
        raise ConfigError(f"{study_dir} is not a study folder with runs: it holds no run "
                          "to export.")
    finished = runs[runs["status"] != "unfinished"].reset_index(drop=True)
    # of the finished runs only: their `device` is the one they ran on, an unfinished one's
    # the spec's ("auto"), which would make the device look varied
    names = hyperparameters(finished)
    metric_names = final_metric_names(finished)
    settings = setting_values(finished, names)
    folders = {run_id: run_folder_name(run_id, values)
               for run_id, values in zip(finished["run_id"], settings, strict=True)}
    previous = exported_runs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_marker(out_dir, study_dir, {**previous, **folders})  # every folder it may hold
    skipped: dict[str, str] = {}
    probe_tags: set[str] = set()
    store = RunStore(study_dir)
    for (_, run), values in zip(finished.iterrows(), settings, strict=True):
        run_id = str(run["run_id"])
        old = out_dir / previous[run_id] if run_id in previous else None
        records = replace_folder(out_dir / folders[run_id], partial(
            _write_run, tbx=tbx, run_dir=store.runs_dir / run_id, run=run, settings=values,
            metric_names=metric_names), old)
        skipped.update(records.skipped)
        probe_tags.update(records.scalars)
    for run_id in set(previous) - set(folders):  # runs the study folder no longer has
        shutil.rmtree(out_dir / previous[run_id], ignore_errors=True)
    figures = sorted((study_dir / "figures").glob("*.png"))
    replace_folder(out_dir / STUDY_FOLDER, partial(
        _write_study, tbx=tbx, study_dir=study_dir, names=names, settings=settings,
        metric_names=metric_names, figures=figures, charts=whole_model_charts(probe_tags)))
    write_marker(out_dir, study_dir, folders)
    return TensorBoardExport(out_dir, len(finished), len(runs) - len(finished), len(figures),
                             skipped)


def tensorboardx(setting: str = "--to") -> SimpleNamespace:
    """The parts of tensorboardX an export writes with (`setting`: the option that asked for
    it, named when the extra is missing)."""
    # imported on use: optional dependency (the normlab[tensorboard] extra)
    modules = {name: import_extra(f"tensorboardX{path}", "tensorboard", setting=setting)
               for name, path in (("writer", ""), ("summary", ".proto.summary_pb2"),
                                  ("builders", ".summary"),
                                  ("api", ".proto.api_pb2"),
                                  ("hparams", ".proto.plugin_hparams_pb2"))}
    return SimpleNamespace(**modules)


# -- one run -----------------------------------------------------------------------------------

def _write_run(folder: Path, tbx: SimpleNamespace, run_dir: Path, run: pd.Series,
               settings: Mapping[str, Any], metric_names: Iterable[str]) -> RunSeries:
    """Write one run's event file into `folder`; return its probe series (and those left
    out)."""
    records = record_series(read_jsonl(run_dir / "records.jsonl"))
    metrics = metric_series(read_jsonl(run_dir / "metrics.jsonl"))
    last = max((step for points in (*metrics.values(), *records.scalars.values())
                for step, _ in points), default=0)
    steps_done = run.get("steps_done")
    final_step = last if steps_done is None or pd.isna(steps_done) else int(steps_done)
    final = {name: [(final_step, value)]
             for name, value in final_metrics(run, metric_names).items()}
    series = _disjoint(run_dir, metrics, records.scalars, final)
    writer = tbx.writer.FileWriter(str(folder))
    try:
        writer.add_summary(session_start(tbx, settings), 0)
        write_scalars(writer, tbx, series)
        writer.add_summary(session_end(tbx, run["status"]), final_step)
    finally:
        writer.close()
    return records


def write_scalars(writer: Any, tbx: SimpleNamespace, series: Series) -> None:
    """`series` as scalar summaries, one event per step."""
    by_step: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for tag, points in series.items():
        for step, value in points:
            by_step[step].append((tag, value))
    for step in sorted(by_step):
        writer.add_summary(tbx.summary.Summary(value=[
            _scalar_value(tbx, tag, value) for tag, value in by_step[step]]), step)


def session_start(tbx: SimpleNamespace, settings: Mapping[str, Any]) -> Any:
    """The HParams session start of a run: its settings as hyperparameters."""
    return _plugin_summary(tbx, _SESSION_START_TAG, tbx.hparams.HParamsPluginData(
        session_start_info=_session_start(tbx, settings, time.time())))


def session_end(tbx: SimpleNamespace, status: str) -> Any:
    """The HParams session end of a run that ended with normlab status `status`."""
    code = "STATUS_FAILURE" if status == "failed" else "STATUS_SUCCESS"
    end = tbx.hparams.SessionEndInfo(status=tbx.api.Status.Value(code), end_time_secs=time.time())
    return _plugin_summary(tbx, _SESSION_END_TAG, tbx.hparams.HParamsPluginData(
        session_end_info=end))


def _disjoint(run_dir: Path, *parts: Series) -> Series:
    """The union of `parts`, or a ConfigError naming the tags two of them share (a probe named
    like a metric kind): one would hide the other's numbers."""
    union: Series = {}
    for part in parts:
        shared = sorted(set(union) & set(part))
        if shared:
            raise ConfigError(f"{run_dir}: probe records and metric rows would share the "
                              f"TensorBoard tag(s) {', '.join(shared)}; normlab cannot export "
                              "both.")
        union.update(part)
    return union


def _scalar_value(tbx: SimpleNamespace, tag: str, value: float) -> Any:
    """A scalar Summary.Value: float32, the one precision TensorBoard's default (fast) loader
    shows; it drops float64 scalars without a word."""
    return tbx.summary.Summary.Value(tag=tag, simple_value=value)


def _session_start(tbx: SimpleNamespace, settings: Mapping[str, Any], start: float) -> Any:
    info = tbx.hparams.SessionStartInfo(start_time_secs=start)
    for name, value in settings.items():
        slot = info.hparams[name]
        if isinstance(value, bool):
            slot.bool_value = value
        elif isinstance(value, float):
            slot.number_value = value
        else:
            slot.string_value = value
    return info


def _plugin_summary(tbx: SimpleNamespace, tag: str, data: Any) -> Any:
    """A Summary of the HParams plugin holding `data` (an HParamsPluginData)."""
    data.version = 0
    metadata = tbx.summary.SummaryMetadata(plugin_data=tbx.summary.SummaryMetadata.PluginData(
        plugin_name=_HPARAMS, content=data.SerializeToString()))
    return tbx.summary.Summary(value=[tbx.summary.Summary.Value(tag=tag, metadata=metadata)])


# -- the study ---------------------------------------------------------------------------------

def _write_study(folder: Path, tbx: SimpleNamespace, study_dir: Path, names: list[str],
                 settings: list[dict[str, Any]], metric_names: list[str],
                 figures: list[Path], charts: Mapping[str, list[str]]) -> None:
    """The study's run: the HParams experiment, the report's figures, and the layout of the
    Custom Scalars dashboard (`charts`: title -> tags drawn together)."""
    writer = tbx.writer.FileWriter(str(folder))
    try:
        writer.add_summary(_plugin_summary(tbx, _EXPERIMENT_TAG, tbx.hparams.HParamsPluginData(
            experiment=_experiment(tbx, study_dir, names, settings, metric_names))), 0)
        for path in figures:
            writer.add_summary(tbx.summary.Summary(value=[tbx.summary.Summary.Value(
                tag=f"figures/{path.stem}", image=_png_image(tbx, path))]), 0)
        if charts:
            writer.add_summary(tbx.builders.custom_scalars({"probes": {
                title: ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]
                for title, tags in charts.items()}}), 0)
    finally:
        writer.close()


def _experiment(tbx: SimpleNamespace, study_dir: Path, names: list[str],
                settings: list[dict[str, Any]], metric_names: list[str]) -> Any:
    """The HParams experiment: each varying setting with the values it takes, each final
    metric (`final/status` with what its numbers mean)."""
    experiment = tbx.api.Experiment(
        name=_study_title(study_dir), time_created_secs=time.time(),
        description=f"normlab study folder {study_dir.resolve()}")
    for name in names:
        values = sorted({row[name] for row in settings if name in row}, key=_domain_order)
        info = experiment.hparam_infos.add(name=name, type=tbx.api.DataType.Value(
            _data_type(values)))
        info.domain_discrete.extend(values)
    codes = ", ".join(f"{code} {status}" for status, code in STATUS_CODES.items())
    for name in metric_names:
        experiment.metric_infos.add(
            name=tbx.api.MetricName(tag=name), display_name=name,
            description=f"status: {codes}" if name == "final/status" else "")
    return experiment


def _data_type(values: list[Any]) -> str:
    if values and all(isinstance(v, bool) for v in values):
        return "DATA_TYPE_BOOL"
    if values and all(isinstance(v, float) for v in values):
        return "DATA_TYPE_FLOAT64"
    return "DATA_TYPE_STRING"


def _domain_order(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (bool, float)) and not math.isnan(value) else (
        1, str(value))


def _study_title(study_dir: Path) -> str:
    try:
        plan = read_study_file(study_dir)
        return f"{plan['study']} ({plan['scale']} scale)"
    except (ConfigError, KeyError, TypeError):
        return study_dir.name


def _png_image(tbx: SimpleNamespace, path: Path) -> Any:
    """A Summary.Image holding the PNG file's bytes as they are (no decoding, no re-encoding)."""
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ConfigError(f"{path} is not a PNG file; run `normlab report` to redraw the "
                          "figures.")
    width, height = struct.unpack(">II", data[16:24])
    channels = _PNG_CHANNELS.get(data[25], 3)
    return tbx.summary.Summary.Image(height=height, width=width, colorspace=channels,
                                     encoded_image_string=data)

