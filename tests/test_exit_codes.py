"""`normlab run` exits 1 when a planned run ends without a result, whatever the executor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import types
from pathlib import Path

import pytest

import fake_grid
import fake_study  # noqa: F401 (registers the "fake" task and study)
from normlab.cli import main
from normlab.execute import slurm
from normlab.execute.local import LocalExecutor
from normlab.studies.plan import plan_study


@pytest.fixture
def lost_run_id() -> str:
    """The run of the fake study that the executors below lose (its highest lr)."""
    return plan_study("fake")[-1].run_id


def test_local_run_that_ends_without_result_exits_1(tmp_path, capsys, monkeypatch,
                                                    lost_run_id):
    run = LocalExecutor.run

    def losing(self, specs, out_dir, on_progress=None):  # a worker lost without a trace
        yield from run(self, [s for s in specs if s.run_id != lost_run_id], out_dir,
                       on_progress)

    monkeypatch.setattr(LocalExecutor, "run", losing)
    assert main(["run", "fake", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"normlab: 1 planned run(s) ended without a result: {lost_run_id} (to run); run " \
           "the same command again to resume them." in err.splitlines()
    monkeypatch.setattr(LocalExecutor, "run", run)
    assert main(["run", "fake", "--out", str(tmp_path)]) == 0  # resumed: every run has one
    assert "without a result" not in capsys.readouterr().err


def test_every_run_with_a_result_exits_0(tmp_path, capsys):
    assert main(["run", "fake", "--out", str(tmp_path)]) == 0
    assert "without a result" not in capsys.readouterr().err


class FakeSubmitit:
    """submitit's SlurmExecutor as far as normlab uses it: the array's tasks run at once, in
    this process, except the one SLURM cancels (it leaves the queue without a result file)."""

    def __init__(self, folder: Path, cancelled: str) -> None:
        self.folder, self.cancelled = folder, cancelled
        self.SlurmExecutor = lambda folder: self

    def update_parameters(self, **parameters) -> None:
        pass

    def map_array(self, function, specs):
        jobs = []
        for i, spec in enumerate(specs):
            lost = spec.run_id == self.cancelled
            result = None if lost else function(spec)
            pickle = self.folder / f"9_{i}_result.pkl"
            if not lost:
                pickle.touch()
            jobs.append(types.SimpleNamespace(job_id=f"9_{i}", result=lambda r=result: r,
                                              paths=types.SimpleNamespace(result_pickle=pickle)))
        return jobs


def test_slurm_tasks_cancelled_without_result_exit_1(tmp_path, capsys, monkeypatch,
                                                     lost_run_id):
    monkeypatch.setattr(slurm, "import_submitit", lambda: FakeSubmitit(tmp_path, lost_run_id))
    monkeypatch.setattr(slurm, "squeue_states", lambda: {})  # the array has left the queue
    monkeypatch.setattr(slurm, "time", types.SimpleNamespace(sleep=lambda s: None))
    assert main(["run", "fake", "--out", str(tmp_path / "study"), "--executor", "slurm"]) == 1
    err = capsys.readouterr().err
    assert f"run {lost_run_id} (SLURM job 9_2) left the queue without a result" in err
    assert f"normlab: 1 planned run(s) ended without a result: {lost_run_id} (to run)" in err


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_ends_run_with_a_message_and_143_and_a_rerun_resumes(tmp_path, workers):
    out = tmp_path / "study"
    options = json.dumps({"sleep": 0.1, "steps": 10})
    command = fake_grid.study_command(out, "--workers", workers, "--set", f"options={options}",
                                      study="fake")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list(out.glob("leases/*.lease")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert stderr.splitlines()[-1] == (
        "normlab: terminated (SIGTERM); finished runs are kept: run the same command again to "
        "resume (an unfinished run goes on from its last checkpoint, if it has one).")
    assert "Traceback" not in stderr and "leaked semaphore" not in stderr
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
