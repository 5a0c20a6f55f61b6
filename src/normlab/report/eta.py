"""The time a study has left, counted in work rather than in runs.

Each run's planned work is the images it will train on times depth times width^2 (a conv net's
cost per image grows with depth and with the square of its width): an E1 run of 72 epochs
weighs 24 sweep runs of 3 epochs. The time left is the work not yet done at the rate measured so
far (work done / time elapsed), where the work done counts each finished run whole and each
running one by its reported fraction of steps, so the members of a pack count one by one and a
pool's runs add up. Cost: pure arithmetic over the planned runs.
"""

from __future__ import annotations

from collections.abc import Mapping

from normlab.runs.spec import RunSpec


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


def time_left(total_work: float, done_work: float, elapsed_s: float) -> float | None:
    """Seconds left: the work not done at the measured rate done_work / elapsed_s; None before
    any work is done or time has passed (no rate yet), 0 when all of it is done."""
    if done_work >= total_work:
        return 0.0
    if done_work <= 0 or elapsed_s <= 0:
        return None
    return (total_work - done_work) * elapsed_s / done_work
