"""Runs that survive preemption: a run interrupted and resumed from its checkpoint gives the
same numbers, bit for bit on CPU, as an uninterrupted run, with no metric row written twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.runs.spec import RunSpec
from normlab.runs.store import CHECKPOINT_FILE, read_json, read_jsonl
from normlab.runs.tasks import execute_run
from normlab.train import loop
from normlab.train.checkpoint import CHECKPOINT_ENV, CheckpointEvery
from normlab.utils.config import ConfigError

# An MLP with BatchNorm on digits, batch 32: 44 steps an epoch, 100 steps in all, SGD with
# momentum and weight decay, augmentation on, a step schedule (lr changes at 50 and 75).
# the plain loop's checkpoints (a lone CPU run is otherwise a pack of one: test_pack_resume.py)
SPEC = RunSpec(model="mlp", depth=3, width=32, norm="batch", batch_size=32, steps=100,
               log_every=1, device="cpu", seed=3, options={"plain_loop": True})
PROBED = SPEC.replace(probes=[{"name": "radial", "every": 7}], steps=60)
SGD_STEP = loop._Run.sgd_step


@pytest.mark.parametrize(("text", "expected"), [
    ("10min", CheckpointEvery(minutes=10.0)), ("0.5min", CheckpointEvery(minutes=0.5)),
    ("1epoch", CheckpointEvery(epochs=1.0)), ("3 epochs", CheckpointEvery(epochs=3.0)),
    ("off", CheckpointEvery()),
])
def test_checkpoint_every_parses(text, expected):
    assert CheckpointEvery.parse(text) == expected


@pytest.mark.parametrize("text", ["10", "0min", "-1min", "2 hours", "epoch", ""])
def test_a_bad_checkpoint_interval_names_the_setting_and_value(text):
    with pytest.raises(ConfigError, match=f"'checkpoint_every' setting .* got {text!r}"):
        CheckpointEvery.parse(text)


def outcome(run_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    """What a run left: result.json (without its time and the record of resumes), every metric
    row and every probe record."""
    result = read_json(run_dir / "result.json")
    del result["wall_time_s"]
    result["provenance"].pop("resumed_from", None)
    return result, read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "records.jsonl")


def resumed_from(run_dir: Path) -> list[dict]:
    return read_json(run_dir / "result.json")["provenance"].get("resumed_from", [])


def interrupt_at(monkeypatch, stop_step: int | None) -> list[int]:
    """Make the train loop raise KeyboardInterrupt before optimizer step `stop_step`; returns
    the list of steps it takes."""
    taken: list[int] = []

    def sgd_step(self, step, x, y):
        if step == stop_step:
            raise KeyboardInterrupt
        taken.append(step)
        return SGD_STEP(self, step, x, y)

    monkeypatch.setattr(loop._Run, "sgd_step", sgd_step)
    return taken


@pytest.mark.parametrize(("spec", "every", "stop"), [
    (SPEC, "1epoch", 70),        # checkpoint at the end of epoch 1 (step 44), killed at 70
    (SPEC, "0.00001min", 80),    # read-backs at 32, 44, 76: resumed mid-epoch from step 76
    (PROBED, "0.00001min", 30),  # probes read back every step: resumed from step 30
], ids=["epoch", "mid-epoch", "probes"])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, spec, every, stop):
    monkeypatch.setenv(CHECKPOINT_ENV, every)
    execute_run(spec, tmp_path / "whole")
    expected = outcome(tmp_path / "whole" / "runs" / spec.run_id)

    interrupt_at(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, tmp_path / "resumed")
    run_dir = tmp_path / "resumed" / "runs" / spec.run_id
    assert (run_dir / CHECKPOINT_FILE).exists() and not (run_dir / "result.json").exists()
    taken = interrupt_at(monkeypatch, None)
    execute_run(spec, tmp_path / "resumed")

    assert 0 < taken[0] <= stop  # it continued from the checkpoint, not from step 0
    assert taken == list(range(taken[0], spec.steps))
    assert outcome(run_dir) == expected  # final numbers, every metric row and probe record
    assert not (run_dir / CHECKPOINT_FILE).exists()  # a finished run keeps no checkpoint
    assert [r["step"] for r in resumed_from(run_dir)] == [taken[0]]  # the resume is recorded
    assert resumed_from(tmp_path / "whole" / "runs" / spec.run_id) == []


def test_without_checkpoints_an_interrupted_run_starts_again_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_ENV, "off")
    interrupt_at(monkeypatch, 50)
    with pytest.raises(KeyboardInterrupt):
        execute_run(SPEC, tmp_path)
    taken = interrupt_at(monkeypatch, None)
    execute_run(SPEC, tmp_path)
    assert taken == list(range(SPEC.steps))
    steps = [r["step"] for r in read_jsonl(tmp_path / "runs" / SPEC.run_id / "metrics.jsonl")
             if "kind" not in r]
    assert steps == list(range(SPEC.steps))


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_to_the_same_numbers(tmp_path):
    """SIGKILL of the process between checkpoints, then a resume in another process."""
    spec = SPEC.replace(steps=100)
    code = ("import sys; from normlab.runs.spec import RunSpec;"
            " from normlab.runs.tasks import execute_run;"
            " execute_run(RunSpec.from_json(sys.argv[1]), sys.argv[2])")
    env = {**os.environ, CHECKPOINT_ENV: "1epoch", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "resumed" / "runs" / spec.run_id
    process = subprocess.Popen([sys.executable, "-c", code, spec.to_json(),
                                str(tmp_path / "resumed")], env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        rows = read_jsonl(run_dir / "metrics.jsonl") if run_dir.exists() else []
        if (run_dir / CHECKPOINT_FILE).exists() and rows and rows[-1].get("step", 0) % 44 > 5:
            process.send_signal(signal.SIGKILL)  # past the checkpoint, mid-epoch
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run([sys.executable, "-c", code, spec.to_json(), str(tmp_path / "resumed")],
                   env=env, check=True)
    subprocess.run([sys.executable, "-c", code, spec.to_json(), str(tmp_path / "whole")],
                   env=env, check=True)  # the same thread count as the resumed run
    assert outcome(run_dir) == outcome(tmp_path / "whole" / "runs" / spec.run_id)
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "kind" not in r]
    assert steps == list(range(spec.steps))
