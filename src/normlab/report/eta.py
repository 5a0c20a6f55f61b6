"""The time a study has left, counted in work rather than in runs.

Each run's planned work is the images it will train on times depth times width^2 (a conv net's
cost per image grows with depth and with the square of its width): an E1 run of 72 epochs
weighs 24 sweep runs of 3 epochs. The work done counts each finished run whole and each running
one by its reported fraction of steps, so the members of a pack count one by one and a pool's
runs add up; a run that ended early (diverged, failed) keeps only the work it did. The time
left is the work not yet done at the rate measured over the last few minutes (`RATE_WINDOW_S`):
a pack of 16 runs does far more work per second than one run alone, so the rate of the runs now
training predicts the next minutes better than the study's average.
Cost: pure arithmetic over the planned runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from normlab.runs.spec import RunSpec

RATE_WINDOW_S = 300.0  # the rate is measured over about the last 5 minutes


def planned_work(spec: RunSpec, train_images: int) -> float:
    """Images `spec` trains on (steps x batch size, else epochs x `train_images`, the size of
    its training set) times depth times width^2, in arbitrary units."""
    images = spec.steps * spec.batch_size if spec.steps is not None else \
        spec.epochs * train_images
    return float(images) * spec.depth * spec.width ** 2


def work_done(work: Mapping[str, float], fractions: Mapping[str, float]) -> float:
    """The work done of runs with planned `work`: each run's work times its fraction done
    (1 when finished; clipped to [0, 1]); runs without a fraction have done none."""
    return sum(w * min(max(fractions.get(run, 0.0), 0.0), 1.0) for run, w in work.items())


def recent_rate(samples: Sequence[tuple[float, float]], now: float,
                window_s: float = RATE_WINDOW_S) -> float | None:
    """Work per second over about the last `window_s` seconds: from the latest of `samples`
    ((time, work done) pairs in time order, the first one at the start) at or before
    now - window_s (the first sample if none is that old) to `now`, with the work of the last
    sample. None when no work was done or no time passed in that span."""
    if not samples:
        return None
    past = [s for s in samples if s[0] <= now - window_s]
    then, before = past[-1] if past else samples[0]
    work = samples[-1][1] - before
    return work / (now - then) if work > 0 and now > then else None


def time_left(total_work: float, done_work: float, rate: float | None) -> float | None:
    """Seconds left: the work not done at `rate` (work per second); None without a rate, 0 when
    all of it is done."""
    if done_work >= total_work:
        return 0.0
    return None if not rate else (total_work - done_work) / rate
