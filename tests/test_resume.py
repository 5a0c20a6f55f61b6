"""Reliability of studies, tested for real: SIGKILL and resume, divergence, failures, corrupt
files, and the process pool giving the same results as sequential execution."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fake_study
from normlab.cli import main
from normlab.execute.local import LocalExecutor
from normlab.runner import run_study
from normlab.runs.store import CorruptRecordError, read_jsonl
from normlab.studies import StudyResults, load_results
from normlab.studies.plan import plan_study

TESTS = str(Path(__file__).parent)


def statuses(out_dir: Path) -> dict[float, str]:
    return dict(zip(*load_results(out_dir)[["lr", "status"]].T.values, strict=True))


def counted(counter: Path) -> collections.Counter:
    return collections.Counter(counter.read_text().split()) if counter.exists() else \
        collections.Counter()


def run_in_progress(out_dir: Path, completed: collections.Counter) -> Path | None:
    """A run folder with metrics but no result, after at least one other run completed."""
    runs = out_dir / "runs"
    for run_dir in runs.iterdir() if completed and runs.exists() else ():
        if run_dir.name not in completed and (run_dir / "metrics.jsonl").exists() \
                and not (run_dir / "result.json").exists():
            return run_dir
    return None


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_does_every_run_exactly_once(tmp_path):
    out, counter = tmp_path / "study", tmp_path / "completed.txt"
    options = {"sleep": 0.15, "steps": 6, "counter": str(counter)}
    code = (f"import sys; sys.path.insert(0, {TESTS!r}); import fake_study; "
            f"from normlab.runner import run_study; "
            f"run_study('fake', {str(out)!r}, overrides={{'options': {options!r}}}, "
            f"report=False)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", code], env=env)
    killed_dir, deadline = None, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            killed_dir = run_in_progress(out, counted(counter))
            if killed_dir is not None:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None and killed_dir is None:
            process.kill()
        process.wait(timeout=30)
    assert killed_dir is not None, "the study ended before a run could be killed mid-way"
    assert process.returncode == -signal.SIGKILL

    # The half-written folder is not taken as done.
    before = load_results(out).set_index("run_id")["status"]
    assert before[killed_dir.name] == "unfinished"
    assert (before == "completed").sum() == sum(counted(counter).values()) >= 1

    results = run_study("fake", out, overrides={"options": options}, report=False)
    planned = [s.run_id for s in plan_study("fake", overrides={"options": options})]
    assert sorted(results.runs["run_id"]) == sorted(planned)
    assert set(results.runs["status"]) == {"completed"}
    assert counted(counter) == collections.Counter(planned)  # every run completed exactly once
    rows = read_jsonl(killed_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # redone from scratch, not appended


def test_a_diverging_run_is_recorded_and_the_study_continues(tmp_path):
    results = run_study("fake", tmp_path, overrides={"options": {"diverge_lr": 0.5}},
                        report=False)
    assert statuses(tmp_path) == {0.01: "completed", 0.1: "completed", 1.0: "diverged"}
    diverged = results.runs[results.runs["status"] == "diverged"].iloc[0]
    assert diverged["diverged_step"] == 2 and diverged["diverged_loss"] == 1e4


def test_a_failed_run_is_recorded_and_retried_on_rerun(tmp_path):
    gate = tmp_path / "gate"
    overrides = {"options": {"crash_unless": str(gate)}}
    first = run_study("fake", tmp_path / "s", overrides=overrides, report=False)
    assert set(first.runs["status"]) == {"failed"}
    assert first.runs["error"].str.contains(f"{gate} does not exist").all()
    assert first.runs["error"].str.contains("Traceback").all()  # the traceback is kept
    gate.touch()
    second = run_study("fake", tmp_path / "s", overrides=overrides, report=False)
    assert set(second.runs["status"]) == {"completed"}


def test_a_crash_in_one_run_does_not_stop_the_others(tmp_path):
    class OneCrashes(fake_study.FakeStudy):
        def specs(self, scale, data=None):
            specs = super().specs(scale, data)
            return [specs[0].replace(options={"crash": "boom"}), *specs[1:]]

    run_study(OneCrashes(), tmp_path, report=False)
    assert sorted(statuses(tmp_path).values()) == ["completed", "completed", "failed"]


def test_finished_runs_are_skipped_on_rerun(tmp_path):
    counter = tmp_path / "count.txt"
    overrides = {"options": {"counter": str(counter)}}
    run_study("fake", tmp_path / "s", overrides=overrides, report=False)
    run_study("fake", tmp_path / "s", overrides=overrides, report=False)
    assert sorted(counted(counter).values()) == [1, 1, 1]


@pytest.mark.parametrize("target", ["result.json", "metrics.jsonl"])
def test_a_corrupt_file_is_reported_by_name(tmp_path, target, capsys):
    run_study("fake", tmp_path, report=False)
    path = next((tmp_path / "runs").iterdir()) / target
    path.write_text(path.read_text()[:-7] + "\n")  # truncated: no longer valid JSON
    with pytest.raises(CorruptRecordError) as info:
        StudyResults.load(tmp_path).metrics()
    assert str(path) in str(info.value)
    if target == "result.json":
        with pytest.raises(CorruptRecordError, match=str(path)):
            load_results(tmp_path)
    capsys.readouterr()
    assert main(["show", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


@pytest.mark.slow
def test_process_pool_gives_the_same_results_as_sequential(tmp_path):
    overrides = {"options": {"diverge_lr": 0.5}}
    run_study("fake", tmp_path / "seq", overrides=overrides, report=False)
    run_study("fake", tmp_path / "pool", overrides=overrides, report=False,
              executor=LocalExecutor(workers=2))
    sequential = fake_study.runs_table(tmp_path / "seq")
    pooled = fake_study.runs_table(tmp_path / "pool")
    assert len(pooled) == 3
    assert pooled.equals(sequential)
    seq_metrics = StudyResults.load(tmp_path / "seq").metrics().drop(columns="wall_time_s")
    pool_metrics = StudyResults.load(tmp_path / "pool").metrics().drop(columns="wall_time_s")
    key = ["run_id", "step"]
    assert pool_metrics.sort_values(key).reset_index(drop=True).equals(
        seq_metrics.sort_values(key).reset_index(drop=True))
