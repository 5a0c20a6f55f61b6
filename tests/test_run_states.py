"""`normlab show` on a study in progress: the state of each run, whatever stage it is at."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict

import pytest

import fake_study  # noqa: F401 (registers the "fake" task and study)
from normlab.cli import main
from normlab.execute import state
from normlab.execute.slurm import record_submission
from normlab.execute.state import RunState, run_states, states_summary
from normlab.runs.lease import LEASE_DIR, Owner, try_claim
from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore
from normlab.runs.tasks import execute_run


def fake_spec(lr: float, **options) -> RunSpec:
    return RunSpec(task="fake", model="mlp", depth=3, norm="none", lr=lr, options=options)


@pytest.fixture
def in_progress(tmp_path, monkeypatch):
    """A study folder with a run in each state; yields (folder, {state: run_id})."""
    runs = {"done": fake_spec(0.01), "diverged": fake_spec(1.0, diverge_lr=0.5),
            "failed": fake_spec(0.1, crash="boom"), "unfinished": fake_spec(0.2),
            "running here": fake_spec(0.3), "to run": fake_spec(0.4),
            "queued": fake_spec(0.5), "running on a node": fake_spec(0.6)}
    for name in ("done", "diverged", "failed"):
        assert execute_run(runs[name], tmp_path) is not None
    store = RunStore(tmp_path)
    store.begin(runs["unfinished"])  # interrupted: a folder, no result.json, no lease
    store.begin(runs["running here"])
    lease = try_claim(tmp_path, runs["running here"].run_id)  # held by this live process
    record_submission(tmp_path, {runs["queued"].run_id: "7_1",
                                 runs["running on a node"].run_id: "7_2"})
    monkeypatch.setattr(state, "squeue_states",
                        lambda: {"7_1": ("PENDING", ""), "7_2": ("RUNNING", "node3")})
    (tmp_path / "study.json").write_text(json.dumps({
        "study": "fake", "scale": "smoke", "data": None, "overrides": {},
        "run_ids": [spec.run_id for spec in runs.values()]}))
    yield tmp_path, {name: spec.run_id for name, spec in runs.items()}
    lease.release()


def test_every_run_has_its_state(in_progress):
    folder, ids = in_progress
    states = run_states(folder, list(ids.values()))
    host = socket.gethostname()
    assert {name: states[run_id] for name, run_id in ids.items()} == {
        "done": RunState("done"), "diverged": RunState("diverged"),
        "failed": RunState("failed"), "unfinished": RunState("unfinished"),
        "running here": RunState("running", host), "to run": RunState("to run"),
        "queued": RunState("queued"), "running on a node": RunState("running", "node3")}
    assert str(states[ids["running on a node"]]) == "running (node3)"


def test_a_dead_writers_run_is_unfinished(tmp_path):
    spec = fake_spec(0.2)
    RunStore(tmp_path).begin(spec)
    dead = Owner(socket.gethostname(), 2**22 + 1, "token", time.time())  # no such process
    (tmp_path / LEASE_DIR).mkdir()
    (tmp_path / LEASE_DIR / f"{spec.run_id}.0.lease").write_text(json.dumps(asdict(dead)))
    assert run_states(tmp_path, [spec.run_id]) == {spec.run_id: RunState("unfinished")}


def test_summary_counts_every_state_and_names_the_live_runs(in_progress):
    folder, ids = in_progress
    lines = states_summary(run_states(folder, list(ids.values()))).splitlines()
    assert lines[0] == ("runs: 1 done, 1 diverged, 1 failed, 2 running, 1 queued, "
                        "1 unfinished, 1 to run")
    assert f"  {ids['running on a node'][:12]}  running (node3)" in lines
    assert f"  {ids['queued'][:12]}  queued" in lines
    assert len(lines) == 4


def test_show_on_a_study_in_progress(in_progress, capsys):
    folder, _ = in_progress
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "5 runs: 1 completed, 1 diverged, 1 failed, 1 unfinished, 1 running" in out
    assert "runs: 1 done, 1 diverged, 1 failed, 2 running, 1 queued, 1 unfinished, 1 to run" \
        in out


def test_show_before_any_run_has_started(tmp_path, capsys):
    ids = [fake_spec(lr).run_id for lr in (0.01, 0.1)]
    (tmp_path / "study.json").write_text(json.dumps({
        "study": "fake", "scale": "smoke", "data": None, "overrides": {}, "run_ids": ids}))
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No runs." in out and "runs: 2 to run" in out
