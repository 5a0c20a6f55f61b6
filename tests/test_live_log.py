"""`--log-to`: runs streamed to TensorBoard and MLflow while they run, from the executors'
workers and from packs, read back with TensorBoard's `EventAccumulator` and a real MLflow
server (the export tests' readers and server) and compared with the run folders, which are the
ground truth. A tool that is down or silent never fails or holds up a run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow.tracking")

import fake_study  # also registers the "fake" study and its task
from normlab.cli import main
from normlab.execute.local import LocalExecutor
from normlab.execute.progress import ProgressReporter
from normlab.execute.settle import run_until_settled
from normlab.export.live import LiveTargets, live_log
from normlab.export.live_tensorboard import TensorBoardLive
from normlab.export.mlflow import export_mlflow
from normlab.export.sender import Sender
from normlab.runner import run_study
from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore, study_record
from normlab.runs.tasks import execute_run
from normlab.runs.verify import verify_store
from normlab.studies import Study, load_results
from normlab.utils.atomic import atomic_write_json
from test_export_mlflow import MlflowClient, TinyTrainStudy, _check_export
from test_export_tensorboard import (
    _accumulator,
    _expected_scalars,
    _hparams,
    _same,
    _scalars,
)
from test_resume import TESTS, counted, run_in_progress


class PackedStudy(TinyTrainStudy):
    """The MLflow tests' study grown to six runs that pack together: two stable lrs and a
    diverging one, two seeds each."""

    name = "live-packed"

    def specs(self, scale, data=None):
        base = super().specs(scale, data)  # lr 0.05 seeds 0 and 1, lr 1e3 seed 0
        return [*base, *(s.replace(lr=0.2) for s in base[:2]), base[2].replace(seed=1)]


class Notices(ProgressReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def notice(self, message: str) -> None:
        self.lines.append(message)


def _planned(study: Study, study_dir: Path) -> list[RunSpec]:
    specs = study.specs("smoke")
    study_dir.mkdir(parents=True)
    atomic_write_json(study_dir / "study.json",
                      study_record(study.name, "smoke", None, {}, [s.run_id for s in specs]))
    return specs


def run_live(executor, study: Study, study_dir: Path, log_to: list[str]) -> LiveTargets:
    """The study's runs through `executor` with live logging and no closing export, so that
    what the tools hold is what the workers streamed."""
    specs = _planned(study, study_dir)
    live = live_log(log_to, study_dir)
    live.plan(specs)
    run_until_settled(executor, specs, RunStore(study_dir), ProgressReporter(), live=live)
    live.wait()
    return live


def check_live_tensorboard(study_dir: Path, target: TensorBoardLive) -> None:
    """Each run's live folder holds every number of its files (as the export would, but for
    p(diverge), which only the study knows), its hyperparameters and its session end."""
    runs = load_results(study_dir).set_index("run_id")
    assert set(target.folders) == set(runs.index)
    for run_id, name in target.folders.items():
        row, run_dir = runs.loc[run_id], study_dir / "runs" / run_id
        events = _accumulator(target.out_dir / name)
        expected = _expected_scalars(run_dir, row, int(row["steps_done"]))
        expected.pop("final/p_diverge", None)
        got = _scalars(events)
        wrong = {t: (got.get(t), e) for t, e in expected.items()
                 if not _same(got.get(t, []), e)}
        assert not wrong and set(got) == set(expected), (run_id, wrong, set(got) ^ set(expected))
        assert _hparams(events) == target.settings[run_id]


@pytest.mark.parametrize("executor", [LocalExecutor(pack=3), LocalExecutor(workers=2, pack=3)],
                         ids=["packs in this process", "packs in two worker processes"])
def test_tensorboard_gets_every_number_as_the_runs_log_it(executor, tmp_path):
    live = run_live(executor, PackedStudy(), tmp_path / "study",
                     [f"tensorboard:{tmp_path / 'tb'}"])
    runs = load_results(tmp_path / "study")
    assert set(runs["pack_size"]) == {3} and set(runs["status"]) == {"completed", "diverged"}
    check_live_tensorboard(tmp_path / "study", live.targets[0])


def test_mlflow_runs_are_there_whole_before_the_closing_export(server, tmp_path):
    notices = Notices()
    run_study(PackedStudy(), tmp_path / "study", executor=LocalExecutor(workers=2, pack=3),
              log_to=[f"mlflow:{server.uri}"], progress=notices, report=False)
    # the closing export found every run written whole by the workers' streams
    assert any("0 run(s) new, 0 replaced, 6 already there" in line for line in notices.lines)
    client = MlflowClient(server.uri)
    (experiment,) = [e for e in client.search_experiments()
                     if e.name.endswith(str((tmp_path / "study").resolve()))]
    (parent,) = client.search_runs([experiment.experiment_id],
                                   "tags.`normlab.role` = 'study'")
    _check_export(client, tmp_path / "study", experiment.experiment_id, parent.info.run_id,
                  tmp_path)


def test_the_closing_export_leaves_tensorboard_as_an_export_writes_it(tmp_path, capsys):
    study_dir, out = tmp_path / "study", tmp_path / "tb"
    assert main(["run", "fake", "--out", str(study_dir), "--set",
                 'options={"diverge_lr": 0.5}', "--log-to", f"tensorboard:{out}"]) == 0
    assert f"{out}: 3 run(s) and 1 figure(s) for TensorBoard" in capsys.readouterr().err
    exported = tmp_path / "exported"
    assert main(["export", str(study_dir), "--to", "tensorboard", str(exported)]) == 0
    live_folders = sorted(p.name for p in out.iterdir())
    assert live_folders == sorted(p.name for p in exported.iterdir())
    for name in live_folders:
        if (out / name).is_dir():
            assert _scalars(_accumulator(out / name)) == _scalars(_accumulator(exported / name))


def test_a_server_killed_mid_study_loses_nothing_and_the_export_is_redone(server, tmp_path,
                                                                           capsys):
    class KillsTheServer(Notices):
        def run_end(self, spec, result, done, total):
            if done == 1:
                server.stop()

    reference = tmp_path / "reference"
    study_dir = tmp_path / "study"
    notices = KillsTheServer()
    run_study("fake", study_dir, overrides={"options": {"diverge_lr": 0.5}},
              log_to=[f"mlflow:{server.uri}"], progress=notices)
    run_study("fake", reference, overrides={"options": {"diverge_lr": 0.5}})
    assert verify_store(study_dir) == []
    for run_dir in (reference / "runs").iterdir():  # the same runs, the same numbers
        for name in ("metrics.jsonl", "spec.json"):
            assert (study_dir / "runs" / run_dir.name / name).read_bytes() == \
                (run_dir / name).read_bytes()
    assert sorted(load_results(study_dir)["status"]) == sorted(load_results(reference)["status"])
    err = capsys.readouterr().err
    assert err.count("does not answer") == 1, err
    assert any("not in MLflow whole" in line for line in notices.lines), notices.lines

    server.start()
    export_mlflow(study_dir, server.uri)
    client = MlflowClient(server.uri)
    (experiment,) = [e for e in client.search_experiments()
                     if e.name.endswith(str(study_dir.resolve()))]
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`normlab.role` = 'study'")
    _check_export(client, study_dir, experiment.experiment_id, parent.info.run_id, tmp_path)


@pytest.mark.slow
def test_a_study_killed_mid_run_and_rerun_has_each_run_once_and_whole(server, tmp_path):
    """SIGKILL while a run streams (its MLflow run stays half-written), then the same command:
    the restarted run replaces its half-written MLflow run, and every run is there once."""
    out, counter = tmp_path / "study", tmp_path / "completed.txt"
    options = {"sleep": 0.15, "steps": 6, "counter": str(counter)}
    code = (f"import sys; sys.path.insert(0, {TESTS!r}); import fake_study; "
            "from normlab.runner import run_study; "
            f"run_study('fake', {str(out)!r}, overrides={{'options': {options!r}}}, "
            f"report=False, log_to=['mlflow:{server.uri}'])")
    process = subprocess.Popen([sys.executable, "-c", code])
    killed, deadline = None, time.monotonic() + 120
    try:
        while killed is None and time.monotonic() < deadline and process.poll() is None:
            killed = run_in_progress(out, counted(counter))
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert killed is not None, "the study ended before a run could be killed mid-way"
    notices = Notices()
    run_study("fake", out, overrides={"options": options}, report=False,
              log_to=[f"mlflow:{server.uri}"], progress=notices)
    client = MlflowClient(server.uri)
    (experiment,) = [e for e in client.search_experiments()
                     if e.name.endswith(str(out.resolve()))]
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`normlab.role` = 'study'")
    _check_export(client, out, experiment.experiment_id, parent.info.run_id, tmp_path)
    assert any(" 0 removed" in line for line in notices.lines), notices.lines


@pytest.mark.slow
def test_a_silent_server_never_holds_a_run_up(tmp_path, capsys):
    """A server that accepts connections and never answers: the runs end with their writes
    still queued (the training never waited for them), and the study says so."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        notices = Notices()
        run_study("fake", tmp_path / "study", log_to=[f"mlflow:{uri}"], progress=notices)
    # every run ended while all its writes were still waiting for the server
    assert set(load_results(tmp_path / "study")["status"]) == {"completed"}
    (dropped,) = [line for line in notices.lines if "live write(s)" in line]
    assert int(dropped.split()[0]) >= 3 * 2  # each run's start and end at least
    assert capsys.readouterr().err.count("does not answer") == 1
    assert any("not in MLflow whole" in line for line in notices.lines)


@pytest.mark.parametrize("value", ["bogus", "tensorboard:", "mlflow:/not/a/server",
                                   "wandb:project"])
def test_a_bad_log_to_is_refused_before_any_run_naming_the_forms(value, tmp_path, capsys):
    assert main(["run", "fake", "--out", str(tmp_path / "study"), "--log-to", value]) == 2
    err = capsys.readouterr().err
    assert "'--log-to' setting takes tensorboard:DIR or mlflow:URI" in err and repr(value) in err
    assert not (tmp_path / "study" / "runs").exists()


def test_a_tensorboard_folder_holding_something_else_is_refused(tmp_path, capsys):
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "notes.txt").write_text("mine")
    assert main(["run", "fake", "--out", str(tmp_path / "study"), "--log-to",
                 f"tensorboard:{tmp_path / 'tb'}"]) == 2
    assert "holds no normlab export" in capsys.readouterr().err
    assert not (tmp_path / "study" / "runs").exists()


def test_the_live_folder_names_follow_the_settings_that_vary(tmp_path):
    specs = _planned(PackedStudy(), tmp_path / "study")
    live = live_log([f"tensorboard:{tmp_path / 'tb'}"], tmp_path / "study")
    live.plan(specs)
    target = live.targets[0]
    assert {name.split(",run=")[0] for name in target.folders.values()} == {
        f"lr={lr},seed={seed}" for lr in ("0.05", "0.2", "1000") for seed in (0, 1)}
    marker = json.loads((tmp_path / "tb" / "normlab-export.json").read_text())
    assert marker["runs"] == target.folders
    assert pd.Series(list(target.settings.values())).map(len).eq(2).all()


class Unreachable(ConnectionError):
    pass


def test_the_sender_keeps_order_and_tries_again_until_the_tool_answers(capsys):
    """Jobs run in the order queued; a job the tool does not answer stays first and is tried
    again (after 1 s, then 2 s); the outage and the recovery are each said once."""
    done: list[str] = []
    failures = iter([Unreachable("no connection"), Unreachable("no connection")])

    def flaky() -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        done.append("flaky")

    sender = Sender("the test tool", lambda err: isinstance(err, Unreachable), "`redo`")
    sender.put(lambda: done.append("first"))
    sender.put(flaky)
    sender.put(lambda: done.append("last"))
    assert sender.drain(timeout_s=20) == 0
    assert done == ["first", "flaky", "last"]
    err = capsys.readouterr().err
    assert err.count("the test tool does not answer (no connection)") == 1
    assert err.count("the test tool answers again") == 1


def test_a_refused_write_is_dropped_said_once_and_the_rest_goes_on(capsys):
    done: list[str] = []

    def refused() -> None:
        raise ValueError("bad request")

    sender = Sender("the test tool", lambda err: False, "`redo`")
    for job in (refused, lambda: done.append("a"), refused, lambda: done.append("b")):
        sender.put(job)
    assert sender.drain(timeout_s=20) == 0
    assert done == ["a", "b"]
    assert capsys.readouterr().err.count("ValueError: bad request") == 1


def test_a_stream_that_cannot_open_leaves_the_run_to_run(tmp_path, capsys):
    class Broken:
        def open(self, spec, run_dir):
            raise RuntimeError("the extra is missing on this worker")

        def wait(self):
            pass

    spec = fake_study.FakeStudy().specs("smoke")[0]
    result = execute_run(spec, tmp_path / "study", live=Broken())
    assert result is not None and result.status == "completed"
    assert "is not streamed to its tracking tool (RuntimeError: the extra is missing" in \
        capsys.readouterr().err
