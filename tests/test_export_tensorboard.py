"""`normlab export DIR --to tensorboard OUT`, read back with TensorBoard's own readers.

Every scalar is compared with metrics.jsonl and records.jsonl (its steps, and its value as the
float32 TensorBoard stores), the HParams session of each run with the study's runs table, the
experiment with the settings that vary, the images with the report's PNG files; and a real
`tensorboard` server is asked what its dashboards show.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

import fake_study  # noqa: F401 (registers the "fake" study and its task)
from mlflow_server import free_port
from normlab.cli import main
from normlab.export import export_tensorboard
from normlab.export.series import (
    final_metric_names,
    final_metrics,
    metric_series,
    record_series,
    setting_values,
    whole_model_charts,
)
from normlab.export.target import MARKER, run_folder_name
from normlab.runner import run_study
from normlab.runs.spec import RunSpec
from normlab.runs.store import files_record
from normlab.runs.verify import DamagedStoreError
from normlab.studies import Study, load_results
from normlab.utils.config import ConfigError

STATUS = {"completed": 0, "diverged": 1, "failed": 2}


# -- reading an export back ------------------------------------------------------------------

def _accumulator(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _scalars(events: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _hparams(events: EventAccumulator) -> dict[str, object]:
    content = events.PluginTagToContent("hparams")[hparams_metadata.SESSION_START_INFO_TAG]
    start = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in
            start.hparams.items()}


def _exported_runs(out: Path) -> dict[str, Path]:
    """run id -> its folder in the export (read from the folder names, not the marker)."""
    folders = [p for p in out.iterdir() if p.is_dir() and p.name != "study"]
    return {p.name.rsplit(",run=", 1)[-1].removeprefix("run="): p for p in folders}


def _f32(value) -> float:
    return math.nan if value is None else float(np.float32(value))


def _same(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Equal steps and equal values, NaN equal to NaN (no tolerance)."""
    return len(got) == len(expected) and all(
        gs == es and (gv == ev or (math.isnan(gv) and math.isnan(ev)))
        for (gs, gv), (es, ev) in zip(got, expected, strict=True))


def _expected_scalars(run_dir: Path, row: pd.Series, final_step: int) -> dict:
    """What the export must hold for one run, computed from its files and the runs table by the
    rules of docs/tracking.md: per-step rows under train/, eval rows under eval/, every number
    but step and epoch (null: NaN); each probe record with a step and a value under
    probe/quantity/layer/channel/gradient/mode (those it has); the final metrics at the run's
    last step."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row_ = json.loads(line)
        prefix = "eval" if row_.get("kind") == "eval" else "train"
        for key, value in row_.items():
            if key in ("step", "epoch", "kind"):
                continue
            expected.setdefault(f"{prefix}/{key}", []).append((row_["step"], _f32(value)))
    records = run_dir / "records.jsonl"
    for line in records.read_text().splitlines() if records.exists() else []:
        record = json.loads(line)
        parts = [record["probe"]] + [str(record[k]) for k in ("quantity", "layer", "channel",
                                                                    "gradient", "mode")
                                     if k in record]
        expected.setdefault("/".join(parts), []).append((record["step"], _f32(record["value"])))
    for column in ("test_acc", "test_loss", "train_acc", "train_loss", "final_lr",
                   "diverged_epoch", "diverged_step", "p_diverge"):
        value = row.get(column)
        if value is not None and not pd.isna(value):
            expected[f"final/{column}"] = [(final_step, _f32(value))]
    expected["final/status"] = [(final_step, float(STATUS[row["status"]]))]
    return expected


def _check_export(study_dir: Path, out: Path, hyperparameters: set[str]) -> None:
    """Every run of the study, every scalar, every HParams record and the experiment."""
    runs = load_results(study_dir).set_index("run_id")
    exported = _exported_runs(out)
    assert set(exported) == set(runs.index)
    for run_id, folder in exported.items():
        row, run_dir = runs.loc[run_id], study_dir / "runs" / run_id
        assert len(list(folder.iterdir())) == 1  # one event file
        events = _accumulator(folder)
        expected = _expected_scalars(run_dir, row, int(row["steps_done"]))
        got = _scalars(events)
        unexpected = {t: (got.get(t), e) for t, e in expected.items()
                      if not _same(got.get(t, []), e)}
        assert not unexpected and set(got) <= set(expected), (run_id, unexpected)
        hparams = _hparams(events)
        assert set(hparams) == hyperparameters
        for name, value in hparams.items():
            assert value == (row[name] if isinstance(value, str) else float(row[name]))
        end = hparams_metadata.parse_session_end_info_plugin_data(
            events.PluginTagToContent("hparams")[hparams_metadata.SESSION_END_INFO_TAG])
        assert end.status == (2 if row["status"] == "failed" else 1)  # FAILURE / SUCCESS
    study = _accumulator(out / "study")
    experiment = hparams_metadata.parse_experiment_plugin_data(
        study.PluginTagToContent("hparams")[hparams_metadata.EXPERIMENT_TAG])
    domains = {info.name: sorted(v.number_value if v.WhichOneof("kind") == "number_value"
                                 else v.string_value for v in info.domain_discrete.values)
               for info in experiment.hparam_infos}
    assert domains == {name: sorted(runs[name].map(
        lambda v: v if isinstance(v, str) else float(v)).unique()) for name in hyperparameters}
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert {"final/status", "final/diverged_step", "final/p_diverge"} <= metrics
    assert "final/test_acc" in metrics


# -- the fake study: fast --------------------------------------------------------------------

@pytest.fixture
def fake_dir(tmp_path) -> Path:
    """The fake study (three lrs, the largest diverges) with its report's figure."""
    study_dir = tmp_path / "fake"
    run_study("fake", study_dir, overrides={"options": {"diverge_lr": 0.5}})
    return study_dir


def test_export_holds_every_number_of_the_fake_study(fake_dir, tmp_path):
    out = tmp_path / "tb"
    export = export_tensorboard(fake_dir, out)
    assert (export.runs, export.unfinished, export.figures) == (3, 0, 1)
    _check_export(fake_dir, out, {"lr"})
    scalars = _scalars(_accumulator(next(p for p in out.iterdir() if "lr=1," in p.name)))
    assert scalars["final/status"] == [(2, 1.0)] and scalars["final/diverged_step"] == [(2, 2.0)]
    assert "final/test_acc" not in scalars  # a diverged run has no accuracy: left blank
    study = _accumulator(out / "study")
    assert study.Tags()["images"] == ["figures/fake_acc_vs_lr"]
    image = study.Images("figures/fake_acc_vs_lr")[0]
    assert image.encoded_image_string == (fake_dir / "figures" / "fake_acc_vs_lr.png").read_bytes()


def test_exporting_again_replaces_each_run_and_follows_a_grown_study(fake_dir, tmp_path):
    out = tmp_path / "tb"
    assert main(["export", str(fake_dir), "--to", "tensorboard", str(out)]) == 0
    first = sorted(p.name for p in out.iterdir())
    assert main(["export", str(fake_dir), "--to", "tensorboard", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == first  # no run twice, nothing left over
    _check_export(fake_dir, out, {"lr"})  # one event file per run, each scalar once
    # the study grows: seed now varies, so every run's folder has a new name
    run_study("fake", fake_dir, overrides={"options": {"diverge_lr": 0.5}, "seed": 1})
    assert main(["export", str(fake_dir), "--to", "tensorboard", str(out)]) == 0
    assert len(_exported_runs(out)) == 6
    old_names = [name for name in first if "run=" in name]
    assert len(old_names) == 3 and not [p for p in out.iterdir() if p.name in old_names]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no hidden leftovers
    _check_export(fake_dir, out, {"lr", "seed"})


def test_unfinished_runs_are_left_out_and_counted(fake_dir, tmp_path):
    spec = RunSpec(task="fake", model="mlp", depth=3, norm="none", lr=0.3, data="digits")
    unfinished = fake_dir / "runs" / spec.run_id
    unfinished.mkdir()
    (unfinished / "spec.json").write_text(spec.to_json())
    export = export_tensorboard(fake_dir, tmp_path / "tb")
    assert (export.runs, export.unfinished) == (3, 1)
    assert spec.run_id not in _exported_runs(tmp_path / "tb")
    assert "1 unfinished run(s)" in export.summary()
    # the unfinished run's device is its spec's "auto", the others' the "cpu" they ran on:
    # no hyperparameter for that
    for folder in _exported_runs(tmp_path / "tb").values():
        assert set(_hparams(_accumulator(folder))) == {"lr"}


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", *argv])
    return code, err.getvalue()


def test_a_probe_named_like_a_metric_kind_is_refused_not_merged(fake_dir, tmp_path):
    run_dir = next((fake_dir / "runs").iterdir())
    (run_dir / "records.jsonl").write_text(json.dumps(
        {"probe": "train", "step": 1, "quantity": "train_loss", "value": 0.0}) + "\n")
    result = json.loads((run_dir / "result.json").read_text())
    result["files"] = files_record(run_dir)  # a sound folder, as if the run had logged it
    (run_dir / "result.json").write_text(json.dumps(result))
    with pytest.raises(ConfigError, match="share the TensorBoard tag"):
        export_tensorboard(fake_dir, tmp_path / "tb")


def test_bad_input_exits_2_with_one_line_and_writes_nothing(fake_dir, tmp_path):
    other = tmp_path / "other"
    (other / "runs").mkdir(parents=True)
    assert main(["export", str(fake_dir), "--to", "tensorboard", str(tmp_path / "tb")]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = {
        ("--to", "wandb"):
            "The '--to' setting must be one of 'tensorboard', 'mlflow'; got 'wandb'.",
        ("dir", str(tmp_path / "missing")): "is not a study folder: it is not there.",
        ("out", str(a_file)): "is a file, not a folder",
        ("out", str(foreign)): "is not empty and holds no normlab export",
        ("dir", str(other)): "holds the export of another study folder",
    }
    for (what, value), message in cases.items():
        study, to, out = str(fake_dir), "tensorboard", str(tmp_path / "new")
        study, to, out = {"--to": (study, value, out), "dir": (value, to, str(tmp_path / "tb")),
                          "out": (study, to, value)}[what]
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        code, err = _cli(study, "--to", to, out)
        assert code == 2 and err.count("\n") == 1 and message in err, (what, err)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


def test_a_damaged_study_folder_is_refused_naming_the_file(fake_dir, tmp_path):
    metrics = next((fake_dir / "runs").iterdir()) / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-10])
    code, err = _cli(str(fake_dir), "--to", "tensorboard", str(tmp_path / "tb"))
    assert code == 1 and str(metrics) in err
    assert not (tmp_path / "tb").exists()
    with pytest.raises(DamagedStoreError, match=r"metrics\.jsonl"):
        export_tensorboard(fake_dir, tmp_path / "tb")


def test_without_tensorboardx_the_extra_is_named(fake_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # an import of it fails
    with pytest.raises(ConfigError, match=r"pip install 'normlab\[tensorboard\]'"):
        export_tensorboard(fake_dir, tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


# -- the mapping rules, on hand-made rows ----------------------------------------------------

def test_metric_rows_keep_per_step_and_eval_apart():
    rows = [{"step": 0, "epoch": 0.0, "lr": 0.1, "loss": 2.3, "acc": 0.1},
            {"step": 1, "epoch": 0.5, "lr": 0.1, "loss": None, "acc": 0.0, "note": "x",
             "flag": True},
            {"step": 1, "epoch": 0.5, "kind": "eval", "test_acc": 0.5, "train_loss": 2.0}]
    series = metric_series(rows)
    assert set(series) == {"train/lr", "train/loss", "train/acc", "eval/test_acc",
                           "eval/train_loss"}
    assert series["train/loss"][0] == (0, 2.3) and math.isnan(series["train/loss"][1][1])
    assert series["eval/train_loss"] == [(1, 2.0)]


def test_only_probes_with_one_value_per_step_and_tag_are_series():
    sharpness = [{"probe": "sharpness", "step": s, "quantity": q, "value": v, "hvps": 7}
                 for s in (0, 2) for q, v in (("lambda_max", 3.0 + s), ("two_over_lr", 20.0))]
    histogram = [{"probe": "histogram", "step": 0, "quantity": "count", "bin": b, "value": 1.0}
                 for b in range(3)]
    texts = [{"probe": "notes", "step": 0, "value": "text"}]
    series = record_series(sharpness + histogram + texts)
    assert series.scalars == {"sharpness/lambda_max": [(0, 3.0), (2, 5.0)],
                              "sharpness/two_over_lr": [(0, 20.0), (2, 20.0)]}
    assert set(series.skipped) == {"histogram", "notes"}
    assert "several values per step" in series.skipped["histogram"]


def test_settings_keep_one_type_each_and_final_metrics_leave_out_what_is_missing():
    runs = pd.DataFrame({"run_id": ["a", "b"], "lr": [0.1, 1], "compile": [True, False],
                         "options.x": [3, "y"], "options.replicate": [np.nan, 1.0],
                         "status": ["completed", "diverged"], "test_acc": [0.9, np.nan],
                         "diverged_step": [np.nan, 7.0], "p_diverge": [0.5, 0.5],
                         "pack_size": [1, 8], "device": ["cpu", "cpu"]})
    names = ["lr", "compile", "options.x", "options.replicate"]
    assert setting_values(runs, names) == [
        {"lr": 0.1, "compile": True, "options.x": "3"},
        {"lr": 1.0, "compile": False, "options.x": "y", "options.replicate": 1.0}]
    metrics = final_metric_names(runs)
    assert metrics == ["final/test_acc", "final/status", "final/diverged_step",
                       "final/p_diverge"]  # no pack size (how, not what), no strings
    assert final_metrics(runs.iloc[1], metrics) == {
        "final/status": 1.0, "final/diverged_step": 7.0, "final/p_diverge": 0.5}


def test_whole_model_probes_get_one_chart_each():
    tags = ["sharpness/two_over_lr", "sharpness/lambda_max", "radial/norm/conv1",
            "radial/norm/conv2", "noise/scale"]
    assert whole_model_charts(tags) == {"sharpness": ["sharpness/lambda_max",
                                                      "sharpness/two_over_lr"],
                                        "noise": ["noise/scale"]}


def test_run_folder_names_are_readable_unique_and_safe():
    assert run_folder_name("abc", {"norm": "batch", "lr": 0.1}) == "norm=batch,lr=0.1,run=abc"
    assert run_folder_name("abc", {}) == "run=abc"
    name = run_folder_name("abc", {"data": "a/b" * 200})
    assert "/" not in name and name.endswith(",run=abc") and len(name) < 200


def test_the_marker_names_the_study_folder(fake_dir, tmp_path):
    export_tensorboard(fake_dir, tmp_path / "tb")
    marker = json.loads((tmp_path / "tb" / MARKER).read_text())
    assert marker["study_dir"] == str(fake_dir.resolve())
    assert sorted(marker["runs"]) == sorted(_exported_runs(tmp_path / "tb"))


# -- a real training study: slow --------------------------------------------------------------

class TinyTrainStudy(Study):
    """none and batch norm at a stable and a diverging lr, two seeds at the stable one; each run
    measures the sharpness (a scalar series) and activation statistics (one per channel)."""

    name = "tiny-train"
    description = "A tiny training study for the export tests."

    def specs(self, scale, data=None):
        common = dict(data="synthetic", data_options={"n_train": 64, "n_test": 32},
                      model="resnet", depth=8, width=4, batch_size=32, steps=4, log_every=1,
                      schedule="constant", init="xavier_normal",
                      probes=[{"name": "sharpness", "every": 2, "max_iter": 5},
                              {"name": "activation_stats", "every": 2, "layers": [1]}])
        return [RunSpec(norm=norm, lr=lr, seed=seed, **common)
                for norm in ("none", "batch") for lr, seeds in ((0.05, (0, 1)), (1e3, (0,)))
                for seed in seeds]

    def figures(self, results, fig_dir):
        return []


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    study_dir = tmp_path_factory.mktemp("export") / "tiny"
    run_study(TinyTrainStudy(), study_dir, report=False)
    return study_dir


@pytest.mark.slow
def test_export_of_a_trained_study_holds_every_number(trained_dir, tmp_path):
    runs = load_results(trained_dir)
    assert set(runs["status"]) == {"completed", "diverged"}
    export = export_tensorboard(trained_dir, tmp_path / "tb")
    assert export.runs == len(runs) and export.skipped_probes == {}
    _check_export(trained_dir, tmp_path / "tb", {"norm", "lr", "seed"})
    stable = runs[(runs["lr"] == 0.05) & (runs["norm"] == "batch")].iloc[0]
    folder = _exported_runs(tmp_path / "tb")[stable["run_id"]]
    tags = set(_accumulator(folder).Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/lr", "eval/test_acc", "eval/test_loss",
            "sharpness/lambda_max", "sharpness/two_over_lr"} <= tags
    assert any(t.startswith("activation_stats/") for t in tags)
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(_accumulator(
        tmp_path / "tb" / "study").Tensors("custom_scalars__config__")[0].tensor_proto).item())
    charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    assert charts == {"sharpness": [  # the sharpness beside its two thresholds, one chart
        "^sharpness/lambda_max$", "^sharpness/two_one_plus_momentum_over_lr$",
        "^sharpness/two_over_lr$"]}  # activation_stats is per layer and channel: no chart


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def test_a_tensorboard_server_shows_the_scalars_the_hparams_and_the_figures(fake_dir, tmp_path):
    """TensorBoard's default loader (the fast one) drops float64 scalars without a word: this is
    what the dashboards read, not only what the event files hold."""
    out = tmp_path / "tb"
    export_tensorboard(fake_dir, out)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(out),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline and len(tags) < 3:
            time.sleep(0.5)
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"{base}/scalars/tags", timeout=5) as response:
                tags = json.load(response)
        assert len(tags) == 3 and all("train/train_loss" in t for t in tags.values())
        groups = _post(f"{base}/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                "STATUS_RUNNING"]})["sessionGroups"]
        runs = load_results(fake_dir).set_index("lr")
        shown = {g["hparams"]["lr"]: {m["name"]["tag"]: m["value"] for m in g["metricValues"]}
                 for g in groups}
        assert set(shown) == set(runs.index)
        for lr, metrics in shown.items():
            assert metrics["final/status"] == STATUS[runs.loc[lr, "status"]]
            if runs.loc[lr, "status"] == "completed":
                assert metrics["final/test_acc"] == _f32(runs.loc[lr, "test_acc"])
        with urllib.request.urlopen(f"{base}/images/tags", timeout=5) as response:
            assert "figures/fake_acc_vs_lr" in json.load(response)["study"]
    finally:
        server.terminate()
        server.wait(timeout=30)
