"""A store shared by many writers, tested with real processes: leases, takeover of stale leases,
two `normlab run` on one folder, Ctrl-C and SIGKILL of a process pool."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fake_grid
from normlab.runs.lease import HEARTBEAT_ENV, STALE_ENV, Lease, Owner, try_claim
from normlab.runs.store import read_json, read_jsonl
from normlab.studies.plan import plan_study

CLAIMER = """
import sys, time
from normlab.runs.lease import LeaseLostError, try_claim
lease = try_claim(sys.argv[1], "run1")
print("claimed" if lease.__class__.__name__ == "Lease" else "refused", flush=True)
sys.stdin.readline()
try:
    lease.check()
    print("held", flush=True)
except LeaseLostError:
    print("lost", flush=True)
"""


@pytest.fixture
def fast_leases(monkeypatch):
    monkeypatch.setenv(HEARTBEAT_ENV, "0.2")
    monkeypatch.setenv(STALE_ENV, "1.0")


def start_claimer(root: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", CLAIMER, str(root)], text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == "claimed"
    return process


def test_a_claimed_run_is_refused_to_others_until_released(tmp_path):
    lease = try_claim(tmp_path, "run1")
    assert isinstance(lease, Lease)
    assert try_claim(tmp_path, "run1") == lease.owner
    assert isinstance(try_claim(tmp_path, "run2"), Lease)  # other runs are free
    lease.release()
    assert not list((tmp_path / "leases").glob("run1.*"))
    assert isinstance(try_claim(tmp_path, "run1"), Lease)


def test_a_live_owner_keeps_its_lease_past_the_stale_timeout(tmp_path, fast_leases):
    process = start_claimer(tmp_path)
    try:
        time.sleep(1.5)  # > stale timeout: only the heartbeat keeps the lease fresh
        owner = try_claim(tmp_path, "run1")
        assert isinstance(owner, Owner) and owner.pid == process.pid
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "held"
    finally:
        process.kill()
        process.wait()


def test_the_lease_of_a_killed_process_is_taken_over_at_once(tmp_path):
    process = start_claimer(tmp_path)
    process.kill()
    process.wait()
    lease = try_claim(tmp_path, "run1")
    assert isinstance(lease, Lease) and lease.path.name == "run1.1.lease"
    lease.release()
    assert not list((tmp_path / "leases").glob("run1.*"))


def test_a_paused_owner_loses_its_stale_lease_and_learns_it(tmp_path, fast_leases):
    process = start_claimer(tmp_path)
    try:
        process.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        lease = try_claim(tmp_path, "run1")
        assert isinstance(lease, Lease)
        process.send_signal(signal.SIGCONT)
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "lost"
        lease.check()  # the new owner still holds it
        lease.release()
    finally:
        process.kill()
        process.wait()


def test_exactly_one_of_many_claimers_wins_a_stale_lease(tmp_path):
    dead = Owner("elsewhere", 1, "dead", 0.0)
    (tmp_path / "leases").mkdir()
    (tmp_path / "leases" / "run1.0.lease").write_text(json.dumps(dead.__dict__))
    os.utime(tmp_path / "leases" / "run1.0.lease", (0, 0))  # never renewed since 1970
    code = ("import sys; from normlab.runs.lease import Lease, try_claim; "
            "print(isinstance(try_claim(sys.argv[1], 'run1'), Lease), flush=True); "
            "sys.stdin.readline()")  # the winner stays alive until every claimer answered
    claimers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                for _ in range(4)]
    answers = [c.stdout.readline().strip() for c in claimers]
    for claimer in claimers:
        claimer.communicate("\n", timeout=60)
    assert sorted(answers) == ["False", "False", "False", "True"]


# -- whole studies ---------------------------------------------------------------------------------

def check_every_run_done_exactly_once(out: Path, counter: Path, steps: int, runs: int = 12,
                                      killed: bool = False) -> None:
    """Every run ran once and is recorded once. With `killed`, a run whose writer was killed
    after its task ended but before its result.json was written ran twice (recorded once)."""
    completed = collections.Counter(counter.read_text().split())
    run_dirs = sorted(p for p in (out / "runs").iterdir())
    assert len(run_dirs) == runs and {p.name for p in run_dirs} == set(completed)
    assert set(completed.values()) <= ({1, 2} if killed else {1}), completed
    for run_dir in run_dirs:
        assert read_json(run_dir / "spec.json")  # no half-written folder
        assert read_json(run_dir / "result.json")["status"] == "completed"
        assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == \
            list(range(1, steps + 1))  # no duplicated metric row
    assert not list((out / "leases").glob("*.lease"))
    assert not list((out / ".staging").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 1.0])
def test_two_studies_on_one_folder_do_every_run_exactly_once(tmp_path, delay):
    out, counter = tmp_path / "study", tmp_path / "completed.txt"
    options = json.dumps({"sleep": 0.05, "steps": 4, "counter": str(counter)})
    command = fake_grid.study_command(out, "--set", f"options={options}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for process in (first, second):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()
    check_every_run_done_exactly_once(out, counter, steps=4)


@pytest.mark.slow
def test_a_study_waits_for_a_run_another_writer_holds_and_takes_it_over_when_stale(tmp_path):
    out, counter = tmp_path / "study", tmp_path / "completed.txt"
    options = {"steps": 2, "counter": str(counter)}
    held = plan_study(fake_grid.FakeGridStudy(), overrides={"options": options})[0].run_id
    (out / "leases").mkdir(parents=True)
    lease = out / "leases" / f"{held}.0.lease"
    lease.write_text(json.dumps(Owner("node-elsewhere", 4242, "other", time.time()).__dict__))
    renewing = threading.Event()
    renewing.set()

    def heartbeat() -> None:  # the other writer, alive until the study says it waits for it
        while renewing.is_set():
            os.utime(lease)
            time.sleep(0.2)

    threading.Thread(target=heartbeat, daemon=True).start()
    env = {**os.environ, HEARTBEAT_ENV: "0.5", STALE_ENV: "2"}
    process = subprocess.Popen(fake_grid.study_command(out, "--set",
                                                       f"options={json.dumps(options)}"),
                               env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "waiting for" in line:
            renewing.clear()  # the other writer dies
            break
    lines += process.stderr.readlines()
    assert process.wait(timeout=300) == 0, "".join(lines)
    assert any("waiting for 1 run(s) claimed by other writers (node-elsewhere pid 4242)" in line
               for line in lines), "".join(lines)
    check_every_run_done_exactly_once(out, counter, steps=2)


def worker_pids(out: Path) -> set[int]:
    pids = set()
    for path in (out / "leases").glob("*.lease") if (out / "leases").exists() else ():
        try:
            pids.add(json.loads(path.read_text())["pid"])
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" \
        if Path(f"/proc/{pid}").exists() else True


def start_pool_study(out: Path, options: str) -> tuple[subprocess.Popen, set[int]]:
    """A `--workers 2` study of the 3-run fake study; returns once both workers hold a run."""
    process = subprocess.Popen(fake_grid.study_command(out, "--workers", "2", "--set",
                                                       f"options={options}", study="fake"),
                               start_new_session=True, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while len(pids := worker_pids(out)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pids) == 2 and process.pid not in pids
    return process, pids


def wait_until_dead(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while (living := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return living


@pytest.mark.slow
def test_ctrl_c_stops_a_process_pool_and_its_workers(tmp_path):
    out, counter = tmp_path / "study", tmp_path / "completed.txt"
    options = json.dumps({"sleep": 0.5, "steps": 8, "counter": str(counter)})
    process, workers = start_pool_study(out, options)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, stderr = process.communicate(timeout=20)  # 3 runs x 4 s would take 8 s more
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert wait_until_dead(workers, 10) == set()
    assert not counter.exists()  # the two runs in flight were stopped, none was started after


@pytest.mark.slow
def test_workers_die_with_a_killed_parent_and_a_rerun_finishes_the_study(tmp_path):
    out, counter = tmp_path / "study", tmp_path / "completed.txt"
    options = json.dumps({"sleep": 0.3, "steps": 4, "counter": str(counter)})
    process, workers = start_pool_study(out, options)
    process.kill()  # SIGKILL: no chance to clean up
    process.wait()
    assert wait_until_dead(workers, 10) == set()
    rerun = subprocess.run(fake_grid.study_command(out, "--workers", "2", "--set",
                                                   f"options={options}", study="fake"),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    check_every_run_done_exactly_once(out, counter, steps=4, runs=3, killed=True)
