"""`--executor ray` against a real local Ray cluster with two workers, one killed mid-study."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import fake_grid
from normlab.execute.local import LocalExecutor
from normlab.execute.ray import RayExecutor, RayResources
from normlab.runner import run_study
from normlab.runs.spec import RunSpec
from normlab.runs.store import read_json, read_jsonl
from normlab.utils.config import ConfigError

TESTS = str(Path(__file__).parent)


def test_ray_resources_reject_bad_values_naming_each_setting():
    with pytest.raises(ConfigError) as err:
        RayResources(gpus_per_run=-0.5, max_retries=-1)
    text = "\n".join(err.value.problems)
    assert "'ray gpus_per_run'" in text and "'ray max_retries'" in text


def kill_first_worker(out: Path, killed: list) -> None:
    """SIGKILL the worker process of the first run that holds a lease."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for lease in (out / "leases").glob("*.lease") if (out / "leases").exists() else ():
            try:
                owner = json.loads(lease.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            os.kill(owner["pid"], signal.SIGKILL)
            killed.append(lease.name.split(".")[0])
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_a_worker_killed_mid_study_has_its_run_retried_and_every_run_done_once(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'normlab[ray]'")
    out, counter = tmp_path / "study", tmp_path / "completed.txt"
    options = {"sleep": 0.3, "steps": 5, "counter": str(counter)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS, "OMP_NUM_THREADS": "1"}})
    killed: list[str] = []
    killer = threading.Thread(target=kill_first_worker, args=(out, killed), daemon=True)
    killer.start()
    try:
        run_study(fake_grid.FakeGridStudy(), out, overrides={"options": options},
                  executor=RayExecutor(RayResources(max_retries=2)), report=False)
    finally:
        ray.shutdown()
    killer.join()
    assert len(killed) == 1
    completed = collections.Counter(counter.read_text().split())
    run_dirs = sorted((out / "runs").iterdir())
    assert len(run_dirs) == 12 and {p.name for p in run_dirs} == set(completed)
    assert set(completed.values()) == {1}  # the killed run too: retried, done once
    for run_dir in run_dirs:
        result = read_json(run_dir / "result.json")
        assert result["status"] == "completed"
        # the thread count that sets a CPU run's rounding is recorded (issue 22: Ray vs local)
        assert (result["provenance"]["torch_num_threads"],
                result["provenance"]["omp_num_threads"]) == (1, "1")
        assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 6))


@pytest.mark.slow
def test_each_ray_worker_streams_its_runs_to_tensorboard(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'normlab[ray]'")
    pytest.importorskip("tensorboard")
    from test_live_log import check_live_tensorboard, run_live

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS, "OMP_NUM_THREADS": "1"}})
    try:
        live = run_live(RayExecutor(), fake_grid.FakeGridStudy(), tmp_path / "study",
                        [f"tensorboard:{tmp_path / 'tb'}"])
    finally:
        ray.shutdown()
    check_live_tensorboard(tmp_path / "study", live.targets[0])


@pytest.mark.slow
def test_a_ray_task_gives_a_cpu_run_the_bits_it_has_in_a_local_pack(tmp_path):
    """Ray runs each spec alone, in its own process: on a CPU that is a pack of one on one
    thread (normlab.train.invariance), so every metric row is the local pack's, bit for bit."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'normlab[ray]'")
    specs = [RunSpec(data="digits", depth=8, width=8, batch_size=64, steps=20, log_every=1,
                     lr=lr, device="cpu", seed=seed)
             for seed, lr in ((0, 0.1), (1, 1.0), (2, 3.0))]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": TESTS}})  # torch's own thread count
    try:
        list(RayExecutor().run(specs, tmp_path / "ray"))
    finally:
        ray.shutdown()
    list(LocalExecutor(pack=3).run(specs, tmp_path / "local"))
    for spec in specs:
        ray_dir, local_dir = (tmp_path / where / "runs" / spec.run_id for where in ("ray", "local"))
        assert (ray_dir / "metrics.jsonl").read_text() == (local_dir / "metrics.jsonl").read_text()
        ray_result, local_result = read_json(ray_dir / "result.json"), read_json(
            local_dir / "result.json")
        assert (ray_result["status"], ray_result["final"]) == (local_result["status"],
                                                               local_result["final"])
        assert (ray_result["provenance"]["pack_size"], local_result["provenance"]["pack_size"]) \
            == (1, 3)
