"""Resuming under any `--pack`: a run interrupted alone or in a pack and resumed alone, in a pack
of the same size or of another size, judged on what it leaves (every metric row, every probe
record, the result) against the same run uninterrupted.

On a CPU every resume is bit for bit: the resumed run continues from its checkpoint's step (no
step retrained), its logs hold every step once, and its numbers are the uninterrupted run's.
- A lone run is a pack of one, and a CPU pack gives each member the same bits at any size
  (normlab.train.invariance), so a pack member may resume alone or in a pack of another size.
- A run the plain loop checkpointed (an older normlab's lone run, or `options.plain_loop`)
  continues by the plain loop under any `--pack`.
The result records each resume in `provenance["resumed_from"]`.
The runs carry the sharpness probe with `batch="first"`, whose kept batch is state a checkpoint
must save (a resume that forgets it measures on another batch: differences of 10-50 %).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from normlab.cli import main
from normlab.execute.local import LocalExecutor
from normlab.runs.spec import RunSpec
from normlab.runs.store import CHECKPOINT_FILE, RunStore, read_json, read_jsonl
from normlab.runs.tasks import RunContext, execute_run
from normlab.runs.verify import verify_store
from normlab.train import TrainState, loop, packed, train
from normlab.train.callbacks import (
    callback_states,
    load_callback_states,
    scheduled,
    with_state,
)
from normlab.train.checkpoint import CHECKPOINT_ENV
from normlab.train.packed import train_packed

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

# An MLP with BatchNorm on digits, batch 64: 21 steps an epoch, 30 in all; checkpointed at the
# end of epoch 1 (step 21), interrupted before step 25. Members differ in seed, lr, momentum
# (one has none), Nesterov and schedule.
BASE = RunSpec(model="mlp", depth=3, width=16, norm="batch", batch_size=64, steps=30,
               log_every=1, device="cpu", seed=3,
               probes=[{"name": "sharpness", "every": 5, "batch": "first", "max_iter": 6}])
MEMBERS = [BASE, BASE.replace(seed=4, lr=0.05, momentum=0.0),
           BASE.replace(seed=5, lr=0.02, nesterov=True, schedule="cosine")]
CHECKPOINT_STEP, STOP = 21, 25


@pytest.fixture
def steps_taken(monkeypatch) -> Any:
    """`interrupt(step)`: the next solo or packed run raises KeyboardInterrupt before that
    optimizer step (None: never); returns the list of steps the runs then take."""
    monkeypatch.setenv(CHECKPOINT_ENV, "1epoch")
    solo_step, pack_step = loop._Run.sgd_step, packed._Pack.sgd_step

    def interrupt(stop: int | None) -> list[int]:
        taken: list[int] = []

        def solo(self, step, x, y):
            if step == stop:
                raise KeyboardInterrupt
            taken.append(step)
            return solo_step(self, step, x, y)

        def pack(self, step):
            if step == stop:
                raise KeyboardInterrupt
            taken.append(step)
            return pack_step(self, step)

        monkeypatch.setattr(loop._Run, "sgd_step", solo)
        monkeypatch.setattr(packed._Pack, "sgd_step", pack)
        return taken

    return interrupt


def run_all(specs: list[RunSpec], out: Path, pack: int) -> None:
    list(LocalExecutor(pack=pack).run(specs, out))


def run_plain(specs: list[RunSpec], out: Path) -> None:
    """Each spec trained by the plain loop into its run folder, as an older normlab did."""
    store = RunStore(out)
    for spec in specs:
        run_dir = store.begin(spec)
        store.finish(spec, train(spec, context=RunContext(run_id=spec.run_id, run_dir=run_dir)))


ARITHMETIC = ("packed", "pack_size", "train_step", "resumed_from")  # how it ran: see `how_ran`


def outcome(out: Path, spec: RunSpec) -> tuple[dict, list[dict], list[dict]]:
    """result.json (without its time and how it ran), every metric row and probe record."""
    run_dir = RunStore(out).run_dir(spec)
    result = read_json(run_dir / "result.json")
    for key in ("wall_time_s", "files"):
        del result[key]
    for key in ARITHMETIC:
        result["provenance"].pop(key, None)
    return result, read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "records.jsonl")


def how_ran(out: Path, spec: RunSpec) -> tuple[bool, int]:
    """(packed, pack size) of the part of the run after its last resume."""
    provenance = read_json(RunStore(out).run_dir(spec) / "result.json")["provenance"]
    return provenance["packed"], provenance["pack_size"]


def resumes(out: Path, spec: RunSpec) -> list[dict]:
    return read_json(RunStore(out).run_dir(spec) / "result.json")["provenance"].get(
        "resumed_from", [])


def interrupted(specs: list[RunSpec], out: Path, pack: int, interrupt: Any) -> None:
    """Run `specs` under `--pack pack` until the interruption before step STOP."""
    interrupt(STOP)
    with pytest.raises(KeyboardInterrupt):
        run_all(specs, out, pack)
    for spec in specs:
        assert (RunStore(out).run_dir(spec) / CHECKPOINT_FILE).exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Path]:
    """The members run through uninterrupted: alone, as a pack of three, by the plain loop."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_all(MEMBERS, out / "solo", pack=1)
    run_all(MEMBERS, out / "pack3", pack=3)
    run_plain(MEMBERS, out / "plain")
    return {"solo": out / "solo", "pack3": out / "pack3", "plain": out / "plain"}


def test_alone_and_in_a_pack_of_three_each_member_has_the_same_bits(uninterrupted):
    for spec in MEMBERS:
        assert outcome(uninterrupted["solo"], spec) == outcome(uninterrupted["pack3"], spec)
        assert how_ran(uninterrupted["solo"], spec) == (True, 1)
    # the plain loop rounds otherwise, so the check above can fail
    assert outcome(uninterrupted["plain"], MEMBERS[0]) != outcome(uninterrupted["solo"],
                                                                  MEMBERS[0])


@pytest.mark.parametrize("resume_pack", [1, 3], ids=["plain-then-solo", "plain-then-pack3"])
def test_a_plain_loop_checkpoint_resumes_bit_for_bit_under_any_pack(
        tmp_path, steps_taken, uninterrupted, resume_pack):
    """Item 9: a run checkpointed alone and resumed with packing was retrained from step 0 and
    appended to its old log. A run the plain loop checkpointed continues by the plain loop."""
    steps_taken(STOP)
    with pytest.raises(KeyboardInterrupt):
        run_plain(MEMBERS[:1], tmp_path)
    steps_taken(None)
    run_all(MEMBERS, tmp_path, resume_pack)  # the interrupted run and two fresh ones
    assert outcome(tmp_path, MEMBERS[0]) == outcome(uninterrupted["plain"], MEMBERS[0])
    assert how_ran(tmp_path, MEMBERS[0]) == (False, 1)
    assert [(r["step"], r["packed"], r["pack_size"]) for r in resumes(tmp_path, MEMBERS[0])] \
        == [(CHECKPOINT_STEP, False, 1)]
    assert resumes(uninterrupted["plain"], MEMBERS[0]) == []


@pytest.mark.parametrize(("every", "resumed_at"), [
    ("1epoch", CHECKPOINT_STEP), pytest.param("0.00001min", STOP, marks=pytest.mark.slow)],
    ids=["epoch-end", "mid-epoch"])
def test_a_pack_resumed_as_the_same_pack_is_bit_for_bit(tmp_path, steps_taken, uninterrupted,
                                                        monkeypatch, every, resumed_at):
    """Item 11: packs never checkpointed, so a killed pack restarted from step 0."""
    monkeypatch.setenv(CHECKPOINT_ENV, every)  # probes read back every step: saved each step
    interrupted(MEMBERS, tmp_path, 3, steps_taken)
    taken = steps_taken(None)
    run_all(MEMBERS, tmp_path, 3)
    assert taken == list(range(resumed_at, BASE.steps))  # from the checkpoint, once
    for spec in MEMBERS:
        assert outcome(tmp_path, spec) == outcome(uninterrupted["pack3"], spec)
        assert how_ran(tmp_path, spec) == (True, 3)
        assert [(r["step"], r["packed"], r["stack_size"]) for r in resumes(tmp_path, spec)] \
            == [(resumed_at, True, 3)]


@pytest.mark.parametrize("resume_pack", [1, pytest.param(2, marks=pytest.mark.slow)],
                         ids=["pack3-then-solo", "pack3-then-pack2"])
def test_a_pack_member_resumed_alone_or_in_another_pack_continues_bit_for_bit(
        tmp_path, steps_taken, uninterrupted, resume_pack):
    interrupted(MEMBERS, tmp_path, 3, steps_taken)
    taken = steps_taken(None)
    run_all(MEMBERS, tmp_path, resume_pack)
    assert sorted(set(taken)) == list(range(CHECKPOINT_STEP, BASE.steps))  # no step redone
    for spec in MEMBERS:
        where = f"seed {spec.seed} resumed with --pack {resume_pack}"
        assert outcome(tmp_path, spec) == outcome(uninterrupted["pack3"], spec), where
        assert [(r["step"], r["packed"], r["stack_size"]) for r in resumes(tmp_path, spec)] \
            == [(CHECKPOINT_STEP, True, 3)], where


@pytest.mark.slow
def test_a_pack_member_resumed_by_execute_run_continues_alone_bit_for_bit(
        tmp_path, steps_taken, uninterrupted):
    interrupted(MEMBERS, tmp_path, 3, steps_taken)
    taken = steps_taken(None)
    execute_run(MEMBERS[1], tmp_path)
    assert taken == list(range(CHECKPOINT_STEP, BASE.steps))
    assert outcome(tmp_path, MEMBERS[1]) == outcome(uninterrupted["pack3"], MEMBERS[1])
    assert how_ran(tmp_path, MEMBERS[1]) == (True, 1)


def test_a_resume_that_forgets_the_probes_kept_batch_would_be_seen(uninterrupted):
    """The comparisons above can fail on a lost probe state: the probe on the kept batch and
    on the current one differ."""
    current = BASE.replace(probes=[{**BASE.probe_schedules()[0], "batch": "current"}])
    context = RunContext()
    train(current, context=context)
    plain = outcome(uninterrupted["plain"], MEMBERS[0])[2]
    assert [r["step"] for r in context.records] == [r["step"] for r in plain]
    assert context.records != plain


# -- the members of one pack stand at one step ---------------------------------------------------

@pytest.mark.slow
def test_members_at_different_steps_are_resumed_in_separate_groups(tmp_path, steps_taken,
                                                                   uninterrupted):
    """One member checkpointed in a pack, one alone, one fresh: each group
    continues from its own step and the packed one as it was."""
    interrupted(MEMBERS[:2], tmp_path, 2, steps_taken)
    (RunStore(tmp_path).run_dir(MEMBERS[1]) / CHECKPOINT_FILE).unlink()  # MEMBERS[1] fresh
    interrupted(MEMBERS[2:], tmp_path, 1, steps_taken)
    steps_taken(None)
    run_all(MEMBERS, tmp_path, 3)
    assert outcome(tmp_path, MEMBERS[2]) == outcome(uninterrupted["solo"], MEMBERS[2])
    for spec in MEMBERS[:2]:
        metrics = outcome(tmp_path, spec)[1]
        steps = [r["step"] for r in metrics if "kind" not in r]
        assert steps == list(range(BASE.steps)), spec.seed


def test_a_pack_refuses_members_at_different_steps(tmp_path, steps_taken):
    interrupted(MEMBERS[:1], tmp_path, 1, steps_taken)
    steps_taken(None)
    contexts = [RunContext(run_id=s.run_id, run_dir=RunStore(tmp_path).begin(s))
                for s in MEMBERS[:2]]
    with pytest.raises(ValueError, match=rf"same step; .* steps \[0, {CHECKPOINT_STEP}\]"):
        train_packed(MEMBERS[:2], contexts=contexts)


# -- callbacks expose their state ----------------------------------------------------------------

class Counter:
    """A user callback that keeps state: how many times it ran, and the first loss it saw."""

    def __init__(self) -> None:
        self.calls, self.first_loss = 0, None

    def __call__(self, state: TrainState) -> None:
        self.calls += 1
        if self.first_loss is None and state.loss is not None:
            self.first_loss = state.loss
        state.context.log_records("counter", [{"calls": self.calls,
                                                "first_loss": self.first_loss}],
                                  step=state.step)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "first_loss": self.first_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls, self.first_loss = state["calls"], state["first_loss"]


@pytest.mark.parametrize("pack", [False, True], ids=["solo", "packed"])
def test_a_user_callbacks_state_is_resumed(tmp_path, steps_taken, pack):
    spec = BASE.replace(probes=[])
    run_dir = RunStore(tmp_path).begin(spec)

    def run() -> None:
        context = RunContext(run_id=spec.run_id, run_dir=run_dir)
        if pack:
            train_packed([spec], callbacks=[[Counter()]], contexts=[context])
        else:
            train(spec, callbacks=[Counter()], context=context)

    steps_taken(STOP)
    with pytest.raises(KeyboardInterrupt):
        run()
    steps_taken(None)
    run()
    records = read_jsonl(run_dir / "records.jsonl")
    assert [r["calls"] for r in records] == list(range(1, BASE.steps + 2))  # step 0 and each
    assert len({r["first_loss"] for r in records[1:]}) == 1


def test_a_study_tasks_measurements_survive_a_resume(tmp_path, steps_taken):
    """The radial study's callback keeps its step-0 measurements until the end of the run,
    where they go into the result: a resume must not lose them."""
    import normlab.studies  # noqa: F401  (registers the study tasks)

    spec = RunSpec(task="radial-probes", model="mlp", depth=3, width=8, batch_size=64,
                   steps=30, device="cpu",
                   options={"mean_batches": 2, "landscape_batches": 1, "points": 3,
                            "points_2d": 2, "spectrum": False})
    steps_taken(None)
    execute_run(spec, tmp_path / "whole")
    interrupted([spec], tmp_path / "resumed", 1, steps_taken)
    steps_taken(None)
    execute_run(spec, tmp_path / "resumed")
    resumed = outcome(tmp_path / "resumed", spec)
    assert "mean_grad_stability_init" in resumed[0]["final"]
    assert resumed == outcome(tmp_path / "whole", spec)


def test_scheduled_probes_and_with_state_expose_the_state_they_keep():
    memory: dict[str, Any] = {}

    def remember(state: TrainState) -> None:
        memory.setdefault("first", state.step)

    stateful = with_state(remember, memory)
    stateless = scheduled("radial", every=5)
    sharpness = scheduled("sharpness", every=5, batch="first")
    assert callback_states([stateless]) == [None]
    assert callback_states([sharpness]) == [{}]  # nothing kept before its first call
    load_callback_states([stateful, stateless], [{"first": 7}, None])
    assert memory == {"first": 7}  # restored in place: the closure sees it
    with pytest.raises(ValueError, match="state of 1 callbacks; this run has 2"):
        load_callback_states([stateful, stateless], [{"first": 7}])
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        load_callback_states([stateless], [{"first": 7}])


def as_written_before(path: Path) -> None:
    """The checkpoint without what normlab added to it for callbacks, numerics and packs."""
    state = torch.load(path, weights_only=True)
    for key in ("format", "callbacks", "numerics", "resumed_from"):
        del state[key]
    torch.save(state, path)


@pytest.mark.slow
@pytest.mark.parametrize(("damage", "reason"), [
    (as_written_before, "it was written before callbacks saved their state"),
    (lambda path: path.write_bytes(path.read_bytes()[:100]), "it cannot be read"),
], ids=["older-format", "unreadable"])
def test_a_checkpoint_that_cannot_be_resumed_exactly_starts_the_run_afresh(
        tmp_path, steps_taken, damage, reason):
    spec = MEMBERS[0]
    interrupted([spec], tmp_path, 1, steps_taken)
    damage(RunStore(tmp_path).run_dir(spec) / CHECKPOINT_FILE)
    steps_taken(None)
    with pytest.warns(RuntimeWarning, match=f"cannot be resumed exactly \\({reason}"):
        run_all(MEMBERS[:2], tmp_path, 2)
    assert resumes(tmp_path, spec) == []  # started again, not resumed
    for member in MEMBERS[:2]:
        steps = [r["step"] for r in outcome(tmp_path, member)[1] if "kind" not in r]
        assert steps == list(range(BASE.steps))


# -- SIGKILL of a study, resumed in another process under another --pack ------------------------

RUN_PLAN = ("import json, sys; from normlab.execute.local import LocalExecutor; "
            "from normlab.runs.spec import RunSpec; "
            "specs = [RunSpec.from_dict(d) for d in json.loads(sys.argv[1])]; "
            "list(LocalExecutor(pack=int(sys.argv[3])).run(specs, sys.argv[2]))")
LONG = [spec.replace(steps=60) for spec in MEMBERS]  # checkpoints at steps 21 and 42
ENV = {**os.environ, CHECKPOINT_ENV: "1epoch", "OMP_NUM_THREADS": "1"}  # one thread each time


def run_plan(out: Path, pack: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN_PLAN,
                             json.dumps([s.to_dict() for s in LONG]), str(out), str(pack)],
                            env=ENV)


@pytest.fixture(scope="module")
def uninterrupted_long(tmp_path_factory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("uninterrupted_long")
    for pack in (1, 3):
        assert run_plan(out / f"pack{pack}", pack).wait() == 0
    return {pack: out / f"pack{pack}" for pack in (1, 3)}


def kill_after_a_checkpoint(out: Path, pack: int) -> None:
    """Start the plan under `--pack pack`; SIGKILL it once the first run has a checkpoint and
    has logged a few steps past it."""
    run_dir = RunStore(out).run_dir(LONG[0])
    process = run_plan(out, pack)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        rows = read_jsonl(run_dir / "metrics.jsonl") if run_dir.exists() else []
        if (run_dir / CHECKPOINT_FILE).exists() and rows and rows[-1]["step"] % 21 > 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the plan ended before it could be killed"
    assert not (run_dir / "result.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(1, 3), (3, 3), (3, 1)],
                         ids=["solo-then-pack3", "pack3-then-pack3", "pack3-then-solo"])
def test_a_study_killed_mid_run_resumes_under_any_pack(tmp_path, uninterrupted_long, first,
                                                       then, capsys):
    kill_after_a_checkpoint(tmp_path, first)
    assert run_plan(tmp_path, then).wait() == 0
    assert verify_store(tmp_path) == []
    assert main(["verify", str(tmp_path)]) == 0
    whole = uninterrupted_long[first]
    for spec in LONG:
        resumed, expected = outcome(tmp_path, spec), outcome(whole, spec)
        steps = [r["step"] for r in resumed[1] if "kind" not in r]
        assert steps == list(range(spec.steps)), spec.seed  # each step once (item 9: 116 twice)
        assert resumed == expected, spec.seed  # bit for bit, whatever the packs
    assert [r["packed"] for r in resumes(tmp_path, LONG[0])] == [True]
