"""`export_mlflow`: a study folder sent to a real MLflow tracking server and read back.

The server is a real `mlflow server` (SQLite backend, artifacts served from a folder under the
test's temporary folder) on a free loopback port, started once for the module (it takes 10-40 s
on 2 cores) and stopped at the end. Every param, metric value and step, tag and artifact of
each run is read back with `MlflowClient` and compared with the run's own files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

mlflow_tracking = pytest.importorskip("mlflow.tracking")

import fake_study  # noqa: E402, F401 (registers the "fake" study and its task)
from mlflow_server import free_port  # noqa: E402
from normlab.cli import main  # noqa: E402
from normlab.export.mlflow import (  # noqa: E402
    COMPLETE_TAG,
    PARAM_VALUE_LIMIT,
    TrackingServerError,
    export_mlflow,
    run_metrics,
    run_params,
)
from normlab.runner import run_study  # noqa: E402
from normlab.runs.spec import RunSpec  # noqa: E402
from normlab.runs.verify import DamagedStoreError, verify_store  # noqa: E402
from normlab.studies import Study, load_results  # noqa: E402
from normlab.utils.config import ConfigError  # noqa: E402

MlflowClient = mlflow_tracking.MlflowClient


# -- study folders ----------------------------------------------------------------------------

class TinyTrainStudy(Study):
    """Batch norm MLPs: two seeds at a stable lr, one diverging lr; per-step and eval rows."""

    name = "tiny-mlflow"
    description = "A tiny training study for the MLflow export tests."

    def specs(self, scale, data=None):
        common = dict(data="synthetic", data_options={"n_train": 64, "n_test": 32}, model="mlp",
                      depth=3, width=8, batch_size=32, steps=4, log_every=1,
                      schedule="constant")
        return [RunSpec(norm="batch", lr=lr, seed=seed, **common)
                for lr, seeds in ((0.05, (0, 1)), (1e3, (0,))) for seed in seeds]

    def figures(self, results, fig_dir):
        return []


@pytest.fixture
def fake_dir(tmp_path) -> Path:
    """The fake study: three lrs, the largest diverges; with its report and figure."""
    study_dir = tmp_path / "fake"
    run_study("fake", study_dir, overrides={"options": {"diverge_lr": 0.5}})
    return study_dir


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _nested_runs(client, experiment_id: str) -> dict[str, list]:
    """normlab run id -> its active MLflow runs (read back without the exporter's code)."""
    out: dict[str, list] = {}
    for run in client.search_runs([experiment_id], max_results=1000):
        if "normlab.run_id" in run.data.tags:
            out.setdefault(run.data.tags["normlab.run_id"], []).append(run)
    return out


def _expected_params(spec: dict) -> dict[str, str]:
    """spec.json flattened by the rules of docs/tracking.md, written out plainly."""
    out = {}
    for key, value in spec.items():
        if key in ("norm_options", "data_options", "options"):
            for inner, inner_value in value.items():
                out[f"{key}.{inner}"] = (inner_value if isinstance(inner_value, str)
                                         else json.dumps(inner_value))
        else:
            out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def _expected_metrics(run_dir: Path, result: dict) -> dict[str, list[tuple[int, float]]]:
    """name -> [(step, value)] from metrics.jsonl and result.json."""
    expected: dict[str, list[tuple[int, float]]] = {}
    metrics = run_dir / "metrics.jsonl"  # a run that failed at once has none
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        row = json.loads(line)
        prefix = "eval" if row.get("kind") == "eval" else "train"
        for key, value in row.items():
            if key not in ("step", "epoch", "kind"):
                expected.setdefault(f"{prefix}/{key}", []).append(
                    (row["step"], math.nan if value is None else value))
    for key, value in result["final"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            expected[f"final/{key}"] = [(result["steps"], value)]
    return expected


def _same(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Equal steps and equal values (no tolerance; NaN equals NaN), one value per step."""
    got, expected = sorted(got, key=lambda i: i[0]), sorted(expected, key=lambda i: i[0])
    return len(got) == len(expected) and all(
        gs == es and (gv == ev or (math.isnan(gv) and math.isnan(ev)))
        for (gs, gv), (es, ev) in zip(got, expected, strict=True))


def _check_export(client, study_dir: Path, experiment_id: str, parent_id: str,
                  tmp_path: Path) -> None:
    """Every finished run once, with every param, metric value and step, tag and artifact."""
    runs = load_results(study_dir)
    finished = runs[runs["status"] != "unfinished"]
    nested = _nested_runs(client, experiment_id)
    assert sorted(nested) == sorted(finished["run_id"])
    for _, row in finished.iterrows():
        (run,) = nested[row["run_id"]]
        run_dir = study_dir / "runs" / row["run_id"]
        spec = json.loads((run_dir / "spec.json").read_text())
        result = json.loads((run_dir / "result.json").read_text())
        assert run.data.params == _expected_params(spec)
        expected = _expected_metrics(run_dir, result)
        assert set(run.data.metrics) == set(expected)
        for name, values in expected.items():
            history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                             name)]
            assert _same(history, values), name
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent_id
        assert tags["normlab.status"] == row["status"] == result["status"]
        assert tags["normlab.device"] == result["provenance"]["device"]
        assert tags["normlab.version"] == result["provenance"]["normlab_version"]
        assert tags["normlab.pack_size"] == str(result["provenance"].get("pack_size", 1))
        if pd.isna(row["p_diverge"]):  # no run of its point finished (failed ones)
            assert "normlab.p_diverge" not in tags
        else:
            assert float(tags["normlab.p_diverge"]) == row["p_diverge"]
        assert tags["normlab.edge"] == str(bool(row["edge"])).lower()
        assert tags.get("normlab.diverged_step") == (
            str(result["diverged_step"]) if result["diverged_step"] is not None else None)
        assert tags[COMPLETE_TAG] == hashlib.sha256(
            (run_dir / "result.json").read_bytes()).hexdigest()
        assert run.info.status == ("FAILED" if row["status"] == "failed" else "FINISHED")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {p.name for p in run_dir.iterdir() if p.is_file()}
        local = client.download_artifacts(run.info.run_id, "result.json", str(tmp_path))
        assert Path(local).read_bytes() == (run_dir / "result.json").read_bytes()
        Path(local).unlink()


# -- without a server: the checks before anything is written ---------------------------------

def test_params_are_the_flattened_spec_and_long_values_are_cut():
    spec = RunSpec(task="fake", model="mlp", depth=3, norm="none", lr=0.1,
                   options={"note": "x" * (PARAM_VALUE_LIMIT + 5), "steps": 3}).to_dict()
    params, cut = run_params(spec)
    assert cut == ["options.note"] and params["options.note"] == "x" * PARAM_VALUE_LIMIT
    assert params == {**_expected_params(spec), "options.note": "x" * PARAM_VALUE_LIMIT}


def test_metrics_keep_per_step_and_eval_rows_apart():
    rows = [{"step": 0, "epoch": 0.0, "loss": 2.0, "acc": 0.5},
            {"step": 2, "epoch": 1.0, "kind": "eval", "test_acc": 0.25, "test_loss": None,
             "finite": True, "note": "x"},
            {"step": 2, "loss": 1.5, "acc": 0.75}]
    metrics = {(name, step): value for name, step, value in run_metrics(rows)}
    assert len(metrics) == len(run_metrics(rows)) == 6
    assert {k: v for k, v in metrics.items() if k != ("eval/test_loss", 2)} == {
        ("train/loss", 0): 2.0, ("train/acc", 0): 0.5, ("eval/test_acc", 2): 0.25,
        ("train/loss", 2): 1.5, ("train/acc", 2): 0.75}
    assert math.isnan(metrics[("eval/test_loss", 2)])


def test_a_bad_uri_and_a_folder_without_a_study_are_refused_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        export_mlflow(tmp_path / "nowhere", "localhost:5000")
    assert len(err.value.problems) == 2
    assert "'localhost:5000'" in err.value.problems[0]
    assert "nowhere is not a study folder" in err.value.problems[1]


def test_a_damaged_folder_is_refused_before_the_server_is_asked(fake_dir):
    run_dir = next((fake_dir / "runs").iterdir())
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9, "train_loss": 1.0}\n')
    with pytest.raises(DamagedStoreError, match=re.escape("metrics.jsonl")):
        export_mlflow(fake_dir, f"http://127.0.0.1:{free_port()}")


def test_without_mlflow_the_error_names_the_extra(fake_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if not installed
    with pytest.raises(ConfigError, match=re.escape("pip install 'normlab[mlflow]'")):
        export_mlflow(fake_dir, f"http://127.0.0.1:{free_port()}")


def test_no_server_at_the_uri_is_an_error_naming_it(fake_dir):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    message = re.escape(f"No MLflow tracking server answers at {uri}")
    with pytest.raises(TrackingServerError, match=message):
        export_mlflow(fake_dir, uri, timeout_s=2)
    assert time.monotonic() - start < 30


def test_the_cli_exports_to_mlflow_and_says_when_no_server_answers(fake_dir, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["export", str(fake_dir), "--to", "mlflow", uri]) == 1
    assert f"No MLflow tracking server answers at {uri}" in capsys.readouterr().err
    assert main(["export", str(fake_dir), "--to", "mlflow", "localhost:5000"]) == 2
    assert "'localhost:5000'" in capsys.readouterr().err


# -- with a real server: slow -----------------------------------------------------------------

@pytest.mark.slow
def test_export_holds_every_number_of_a_trained_study(server, tmp_path):
    study_dir = tmp_path / "tiny"
    run_study(TinyTrainStudy(), study_dir, report=False)
    before = _hashes(study_dir)
    export = export_mlflow(study_dir, server.uri)
    assert _hashes(study_dir) == before  # normlab's folder is only read
    assert len(export.created) == 3 and export.unfinished == () and not export.report
    client = MlflowClient(server.uri)
    experiment = client.get_experiment(export.experiment_id)
    assert experiment.name == f"normlab tiny-mlflow (smoke): {study_dir.resolve()}"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    _check_export(client, study_dir, export.experiment_id, export.parent_run_id, tmp_path)
    runs = load_results(study_dir)
    diverged = runs[runs["status"] == "diverged"].iloc[0]
    (run,) = _nested_runs(client, export.experiment_id)[diverged["run_id"]]
    assert run.data.tags["normlab.diverged_step"] == str(int(diverged["diverged_step"]))
    assert run.info.status == "FINISHED"  # a diverged run is a result, not a failure
    stable = runs[runs["status"] == "completed"].iloc[0]
    (run,) = _nested_runs(client, export.experiment_id)[stable["run_id"]]
    assert {"train/loss", "train/acc", "train/lr", "eval/test_acc", "eval/train_loss",
            "final/test_acc"} <= set(run.data.metrics)


@pytest.mark.slow
def test_exporting_again_never_duplicates_a_run(server, fake_dir, tmp_path, capsys):
    client = MlflowClient(server.uri)
    def settings():
        return {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_HTTP", "MLFLOW_SUP"))}

    environment = settings()
    first = export_mlflow(fake_dir, server.uri)
    assert len(first.created) == 3 and first.report
    assert main(["export", str(fake_dir), "--to", "mlflow", server.uri]) == 0  # the CLI's path
    assert "View run" not in capsys.readouterr().out  # MLflow's line per run, kept quiet
    assert settings() == environment  # the request settings hold for the export only
    parent = client.get_run(first.parent_run_id)
    assert parent.data.tags["normlab.role"] == "study"
    artifacts = {a.path for a in client.list_artifacts(first.parent_run_id)}
    assert artifacts == {"report.html", "study.json", "figures"}
    figures = {Path(a.path).name for a in client.list_artifacts(first.parent_run_id, "figures")}
    assert figures == {p.name for p in (fake_dir / "figures").iterdir()}
    report = client.download_artifacts(first.parent_run_id, "report.html", str(tmp_path))
    assert Path(report).read_bytes() == (fake_dir / "report.html").read_bytes()

    second = export_mlflow(fake_dir, server.uri)
    assert (second.experiment_id, second.parent_run_id) == (first.experiment_id,
                                                           first.parent_run_id)
    assert sorted(second.unchanged) == sorted(first.created) and second.created == ()
    ids = {r.info.run_id for runs in _nested_runs(client, first.experiment_id).values()
           for r in runs}
    assert len(ids) == 3
    assert len(client.search_runs([first.experiment_id])) == 4  # and the study's run
    _check_export(client, fake_dir, first.experiment_id, first.parent_run_id, tmp_path)

    # a run that is unfinished again (its result gone) leaves MLflow too
    gone = next((fake_dir / "runs").iterdir())
    (gone / "result.json").unlink()
    third = export_mlflow(fake_dir, server.uri)
    assert third.removed == third.unfinished == (gone.name,) and len(third.unchanged) == 2
    _check_export(client, fake_dir, first.experiment_id, first.parent_run_id, tmp_path)


@pytest.mark.slow
def test_failed_runs_redone_are_replaced_not_added(server, tmp_path):
    study_dir, marker = tmp_path / "fake", tmp_path / "fixed"
    overrides = {"options": {"crash_unless": str(marker)}}
    run_study("fake", study_dir, overrides=overrides, report=False)
    first = export_mlflow(study_dir, server.uri)
    client = MlflowClient(server.uri)
    failed = _nested_runs(client, first.experiment_id)
    assert len(failed) == 3
    assert all(r.info.status == "FAILED" and "does not exist" in r.data.tags["normlab.error"]
               for (r,) in failed.values())
    marker.touch()
    run_study("fake", study_dir, overrides=overrides, report=False)  # redoes the failed runs
    second = export_mlflow(study_dir, server.uri)
    assert sorted(second.replaced) == sorted(failed) and second.created == ()
    _check_export(client, study_dir, first.experiment_id, first.parent_run_id, tmp_path)
    assert all(r.data.tags["normlab.status"] == "completed"
               for (r,) in _nested_runs(client, first.experiment_id).values())


@pytest.mark.slow
def test_a_server_killed_mid_export_loses_nothing_and_the_export_can_be_redone(
        server, fake_dir, tmp_path, monkeypatch):
    before = _hashes(fake_dir)
    real_log_artifacts = MlflowClient.log_artifacts
    calls = []

    def killed_at_the_second_run(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the first run is whole; the second is cut short
            server.stop()
        return real_log_artifacts(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_artifacts", killed_at_the_second_run)
    failed = re.escape(f"The MLflow server at {server.uri} failed")
    with pytest.raises(TrackingServerError, match=failed):
        export_mlflow(fake_dir, server.uri, timeout_s=5)
    monkeypatch.undo()
    assert _hashes(fake_dir) == before and verify_store(fake_dir) == []

    server.start()
    again = export_mlflow(fake_dir, server.uri)
    assert len(again.unchanged) == 1 and len(again.replaced) == 1 and len(again.created) == 1
    client = MlflowClient(server.uri)
    _check_export(client, fake_dir, again.experiment_id, again.parent_run_id, tmp_path)
    assert len(client.search_runs([again.experiment_id])) == 4
