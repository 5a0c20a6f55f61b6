"""`--executor slurm` against a real single-node SLURM cluster (scripts/slurm-cluster.sh starts
one; CI runs it before the tests). Faults: part of the array cancelled mid-study, and a run's
task signalled as at a time-out (it releases its lease and is requeued)."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import fake_grid
from normlab.cli import main
from normlab.execute.slurm import SlurmExecutor, SlurmResources
from normlab.runs.store import read_json, read_jsonl
from normlab.utils.config import ConfigError

TESTS = str(Path(__file__).parent)


def slurm_answers() -> bool:
    """True when a SLURM controller answers here (sbatch installed is not enough)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10,
                              check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


needs_slurm = pytest.mark.skipif(
    not slurm_answers(),
    reason="no SLURM controller answers here: `bash scripts/slurm-cluster.sh` starts a "
           "single-node cluster (scripts/test.sh does where it may)")


def test_resources_reject_bad_values_naming_each_setting():
    with pytest.raises(ConfigError) as err:
        SlurmResources(cpus_per_task=0, time_min=-5, partition="")
    text = "\n".join(err.value.problems)
    assert "'slurm cpus_per_task'" in text and "'slurm time_min'" in text
    assert "'slurm partition'" in text


def test_resources_from_a_config_file_with_flags_over_it(tmp_path):
    config = tmp_path / "slurm.json"
    config.write_text(json.dumps({"partition": "gpu", "gpus_per_task": 1, "time_min": 240}))
    resources = SlurmResources.from_settings(config, {"time_min": 30, "qos": None})
    assert resources == SlurmResources(partition="gpu", gpus_per_task=1, time_min=30)
    assert resources.submitit_parameters() == {
        "partition": "gpu", "cpus_per_task": 1, "time": 30, "array_parallelism": 256,
        "gpus_per_task": 1}
    config.write_text(json.dumps({"partitoin": "gpu"}))
    with pytest.raises(ConfigError, match=r"'partitoin' .* unknown; allowed: partition"):
        SlurmResources.from_settings(config)


def test_bad_executor_flags_exit_2_before_any_run(tmp_path, capsys):
    code = main(["run", "fake", "--out", str(tmp_path), "--executor", "pbs",
                 "--checkpoint-every", "5", "--slurm-cpus-per-task", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'executor' setting" in err and "'checkpoint_every' setting" in err
    assert not (tmp_path / "runs").exists()


def start_study(out: Path, options: dict, study: str = "fake-grid") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": TESTS, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        fake_grid.study_command(out, "--executor", "slurm", "--set",
                                f"options={json.dumps(options)}", study=study),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def array_id(out: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        submitted = out / "slurm" / "submitted.json"
        if submitted.exists():
            return next(iter(read_json(submitted).values())).split("_")[0]
        time.sleep(0.2)
    raise AssertionError("the study was not submitted")


def check_exactly_once(out: Path, counter: Path, steps: int,
                       runs: int = 12) -> collections.Counter:
    completed = collections.Counter(counter.read_text().split())
    run_dirs = sorted((out / "runs").iterdir())
    assert len(run_dirs) == runs and {p.name for p in run_dirs} == set(completed)
    for run_dir in run_dirs:
        assert read_json(run_dir / "result.json")["status"] == "completed"
        assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == \
            list(range(1, steps + 1))
    return completed


@needs_slurm
@pytest.mark.slow
def test_a_study_with_part_of_its_array_cancelled_resumes_to_every_run_once(tmp_path):
    out, counter = tmp_path / "study", tmp_path / "completed.txt"
    options = {"sleep": 0.3, "steps": 5, "counter": str(counter)}
    first = start_study(out, options, study="fake")  # 3 runs; 2 CPUs: one task waits
    array = array_id(out)
    deadline = time.monotonic() + 120
    while not list((out / "leases").glob("*.lease")) and time.monotonic() < deadline:
        time.sleep(0.1)
    subprocess.run(["scancel", f"{array}_2"], check=True)  # mid-study
    _, stderr = first.communicate(timeout=180)
    assert first.returncode == 1, stderr  # a planned run has no result
    assert len(re.findall(r"left the queue without a result", stderr)) == 1
    assert "normlab: 1 planned run(s) ended without a result" in stderr
    assert sum(collections.Counter(counter.read_text().split()).values()) == 2

    second = start_study(out, options, study="fake")
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    assert "2 already done" in stderr and "submitted 1 runs" in stderr
    completed = check_exactly_once(out, counter, steps=5, runs=3)
    assert set(completed.values()) == {1}

    show = subprocess.run([*fake_grid.study_command(out)[:3], "show", str(out)],
                          capture_output=True, text=True, check=True)
    assert "runs: 3 done" in show.stdout


@needs_slurm
@pytest.mark.slow
def test_a_signalled_task_is_requeued_and_its_run_done_once(tmp_path):
    """USR2 is what SLURM sends before a time-out or preemption (submitit's signal)."""
    out, counter = tmp_path / "study", tmp_path / "completed.txt"
    options = {"sleep": 0.5, "steps": 6, "counter": str(counter)}
    study = start_study(out, options, study="fake")  # its 3 runs
    array = array_id(out)
    task = f"{array}_0"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "leases").glob("*.lease")):
        time.sleep(0.1)
    log = out / "slurm" / task / f"{task}_0_log.err"
    while "Caught signal SIGUSR2" not in (log.read_text() if log.exists() else ""):
        subprocess.run(["scancel", "--signal=USR2", task])  # may say "try again later"
        time.sleep(1.0)
    # SLURM holds a requeued job for a while (BeginTime); let it start now.
    while "PENDING" not in squeue_state(task):
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)
    _, stderr = study.communicate(timeout=300)
    assert study.returncode == 0, stderr
    completed = check_exactly_once(out, counter, steps=6, runs=3)
    assert set(completed.values()) == {1}
    assert "Requeued job" in (out / "slurm" / task / f"{task}_0_log.out").read_text()


def squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                          text=True).stdout


@needs_slurm
@pytest.mark.slow
def test_each_slurm_task_streams_its_run_to_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from test_live_log import check_live_tensorboard, run_live

    monkeypatch.setenv("PYTHONPATH", TESTS)  # the tasks import the fake study from there
    live = run_live(SlurmExecutor(poll_s=0.5), fake_grid.FakeGridStudy(), tmp_path / "study",
                    [f"tensorboard:{tmp_path / 'tb'}"])
    check_live_tensorboard(tmp_path / "study", live.targets[0])
