"""The time left of a study, weighted by each run's planned work, and shown once on the screen
(issue 22: "about 0:00:07 left" with 5 minutes to go, and two estimates on one screen)."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from normlab.report.eta import planned_work, recent_rate, time_left, work_done
from normlab.report.terminal import TerminalProgress
from normlab.runs.result import RunResult
from normlab.runs.spec import RunSpec


def test_planned_work_is_images_times_depth_times_width_squared():
    spec = RunSpec(depth=20, width=8, epochs=3.0, batch_size=64)
    assert planned_work(spec, train_images=1000) == 3 * 1000 * 20 * 8 ** 2
    by_steps = spec.replace(steps=50)  # steps override epochs: 50 batches of 64 images
    assert planned_work(by_steps, train_images=1000) == 50 * 64 * 20 * 8 ** 2


def test_work_done_counts_finished_runs_whole_and_running_ones_by_their_fraction():
    work = {"a": 2.0, "b": 2.0, "c": 4.0, "d": 8.0}
    # a pack's members a and b report their own fractions; c is done; d has not started
    assert work_done(work, {"a": 0.5, "b": 0.25, "c": 1.0}) == 2 * 0.5 + 2 * 0.25 + 4
    assert work_done(work, {"a": 1.5, "b": -1.0, "e": 1.0}) == 2.0  # clipped; e is not planned


def test_time_left_is_the_remaining_work_at_the_measured_rate():
    # two runs of work 1 and 3; the small one finished in 10 s: 3 units at 0.1 unit/s is 30 s
    # (runs x mean time would say 1 run x 10 s = 10 s)
    rate = recent_rate([(0.0, 0.0), (10.0, 1.0)], now=10.0)
    assert rate == pytest.approx(0.1)
    assert time_left(total_work=4.0, done_work=1.0, rate=rate) == pytest.approx(30.0)
    assert time_left(4.0, 0.0, None) is None  # no rate yet
    assert time_left(4.0, 4.0, None) == 0.0


def test_the_rate_is_that_of_the_last_minutes():
    # a pack did 8 units in its first 100 s; one run alone then did 1 unit in 300 s: the next
    # minutes go at the solo rate (1/300), not at the study's average (9/400)
    samples = [(0.0, 0.0), (100.0, 8.0), (400.0, 9.0)]
    assert recent_rate(samples, now=400.0, window_s=300.0) == pytest.approx(1 / 300)
    assert recent_rate(samples, now=400.0, window_s=1000.0) == pytest.approx(9 / 400)
    # nothing reported for a while (a pool's long run): the rate decays with the time passed
    assert recent_rate(samples, now=500.0, window_s=300.0) == pytest.approx(1 / 400)
    assert recent_rate([(0.0, 0.0)], now=10.0) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def _unequal_runs() -> list[RunSpec]:
    """A short run and one with three times its planned work (3 epochs instead of 1)."""
    short = RunSpec(depth=8, width=4, epochs=1.0, lr=0.1)
    return [short, short.replace(epochs=3.0, lr=0.01)]


def _result() -> RunResult:
    return RunResult("completed", steps=3, wall_time_s=10.0, final={"test_acc": 0.5})


def test_the_plain_lines_give_the_time_left_in_work(clock):
    short, long = _unequal_runs()
    stream = io.StringIO()
    progress = TerminalProgress(stream, interval_s=0, clock=clock)
    progress.study_start("s", [short, long], [short, long])
    clock.now = 10.0
    progress.run_end(short, _result(), done=1, total=2)
    assert stream.getvalue().splitlines()[-1].endswith(
        "| 0:00:10 elapsed, about 0:00:30 left")
    clock.now = 25.0  # the long run is half done: 1 + 1.5 of 4 units in 25 s
    progress.run_progress(long.run_id, 0.5, "step 2/4")
    assert stream.getvalue().splitlines()[-1].endswith(
        "| 0:00:25 elapsed, about 0:00:15 left")
    progress.study_end()


def test_a_run_that_diverged_early_leaves_its_unrun_work_out(clock):
    short, long = _unequal_runs()  # work 1 and 3
    stream = io.StringIO()
    progress = TerminalProgress(stream, interval_s=3600, clock=clock)
    progress.study_start("s", [short, long], [long, short])
    clock.now = 10.0
    progress.run_progress(long.run_id, 0.25, "step 1/4")  # 0.75 units
    clock.now = 12.0
    progress.run_end(long, RunResult("diverged", steps=2, diverged_step=2, diverged_loss=2e3,
                                     wall_time_s=12.0), done=1, total=2)
    # 1 unit left at 0.75 units per 12 s: 16 s (counted as done whole, it would say 4 s)
    assert stream.getvalue().splitlines()[-1].endswith("| 0:00:12 elapsed, about 0:00:16 left")


def _screen(progress: TerminalProgress) -> str:
    """The live area as the terminal shows it now."""
    console = Console(file=io.StringIO(), width=160, record=True)
    console.print(progress._live.progress.get_renderable())
    return console.export_text()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_shows_one_estimate_of_the_time_left(clock):
    short, long = _unequal_runs()
    stream = FakeTerminal()
    progress = TerminalProgress(stream, clock=clock)
    progress.study_start("s", [short, long], [short, long])
    clock.now = 2.0
    progress.run_progress(short.run_id, 0.5, "step 1/2")
    assert len(re.findall(r"left|-:--:--", _screen(progress))) == 1
    assert "about 0:00:14 left" in _screen(progress)  # 0.5 of 4 units in 2 s
    clock.now = 10.0
    progress.run_end(short, _result(), done=1, total=2)
    progress.run_progress(long.run_id, 0.25, "step 1/4")
    screen = _screen(progress)
    assert len(re.findall(r"left|-:--:--", screen)) == 1, screen
    # the line printed above the bars for the finished run carries no second estimate
    printed = next(line for line in stream.getvalue().splitlines() if "completed in" in line)
    assert printed.rstrip().endswith("0:00:10 elapsed")
    progress.study_end()
