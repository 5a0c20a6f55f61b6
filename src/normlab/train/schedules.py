"""Learning-rate schedules as a pure function of the step: `lr_at(step, total_steps, spec)`.

Conventions (all schedules):
- `step` is the 0-based index of the optimizer step about to be taken, 0 <= step < total_steps;
  `t = step / total_steps` is the fraction of training done before that step.
- `lr_at = spec.lr * warmup_factor(step) * shape(t)`. The peak learning rate is `spec.lr`.
- Linear warm-up over the first `W = spec.warmup * total_steps` steps (not rounded):
  `warmup_factor = min(1, (step + 1) / W)`, so the first step uses lr / W and the step index
  ceil(W) - 1 reaches the peak. Warm-up multiplies the schedule's own shape, which is defined on
  the whole run (milestones and the cosine are fractions of *all* training, warm-up included).

Shapes:
- constant:  1.
- step:      lr_decay ** (number of milestones m with t >= m); milestones are fractions of
             training (e.g. (0.5, 0.75): divide by 10 at half and three quarters, the paper's
             "divide by 10 when learning plateaus" made explicit).
- cosine:    (1 + cos(pi t)) / 2, from 1 at the first step towards 0 at the end.
- one_cycle: Smith's one-cycle policy ("Super-Convergence", 2018), piecewise linear in three
             phases with a peak at fraction p (default 0.45) and a floor 1/div (default 25):
               rise      t in [0, p):     1/div -> 1
               fall      t in [p, 2p):    1 -> 1/div
               annihilate t in [2p, 1]:   1/div -> 1/(div * 100) (reached at t = 1)
             p and div are read from the run's options `one_cycle_peak` (in (0, 0.5]) and
             `one_cycle_div` (> 1). Momentum is not cycled (momentum stays `spec.momentum`).

Cost: a few float operations; the trainer calls it once per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from normlab.runs.spec import RunSpec
from normlab.utils.config import ConfigError, check_interval, interval_problem

SCHEDULES = ("constant", "step", "cosine", "one_cycle")
ONE_CYCLE_PEAK = 0.45
ONE_CYCLE_DIV = 25.0
ONE_CYCLE_ANNIHILATION = 100.0  # the final phase ends at lr / (div * 100)


def one_cycle_settings(spec: RunSpec) -> tuple[float, float]:
    """(peak fraction p, floor divisor div) of the one-cycle shape, from the run's options."""
    options = spec.mapping("options")
    peak = options.get("one_cycle_peak", ONE_CYCLE_PEAK)
    div = options.get("one_cycle_div", ONE_CYCLE_DIV)
    problems = [p for p in (
        interval_problem("options.one_cycle_peak", peak, 0.0, 0.5, high_open=False),
        interval_problem("options.one_cycle_div", div, 1.0),
    ) if p]
    if problems:
        raise ConfigError(problems)
    return float(peak), float(div)


def _constant(t: float, spec: RunSpec) -> float:
    return 1.0


def _step(t: float, spec: RunSpec) -> float:
    passed = sum(1 for m in spec.milestones if t >= m)
    return spec.lr_decay ** passed


def _cosine(t: float, spec: RunSpec) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t))


def _one_cycle(t: float, spec: RunSpec) -> float:
    peak, div = one_cycle_settings(spec)
    low = 1.0 / div
    if t < peak:
        return low + (1.0 - low) * t / peak
    if t < 2 * peak:
        return 1.0 - (1.0 - low) * (t - peak) / peak
    final = low / ONE_CYCLE_ANNIHILATION
    span = 1.0 - 2 * peak
    return low if span <= 0 else low + (final - low) * (t - 2 * peak) / span


_SHAPES: dict[str, Callable[[float, RunSpec], float]] = {
    "constant": _constant, "step": _step, "cosine": _cosine, "one_cycle": _one_cycle,
}


def warmup_factor(step: int, total_steps: int, warmup: float) -> float:
    """min(1, (step + 1) / W) with W = warmup * total_steps; 1 without warm-up."""
    width = warmup * total_steps
    return 1.0 if width <= 0 else min(1.0, (step + 1) / width)


def lr_at(step: int, total_steps: int, spec: RunSpec) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of `total_steps` steps."""
    check_interval("total_steps", total_steps, 1, kind=int, low_open=False)
    check_interval("step", step, 0, total_steps, kind=int, low_open=False)
    if spec.schedule not in _SHAPES:
        raise ConfigError.choice("schedule", spec.schedule, SCHEDULES)
    shape = _SHAPES[spec.schedule](step / total_steps, spec)
    return spec.lr * warmup_factor(step, total_steps, spec.warmup) * shape
