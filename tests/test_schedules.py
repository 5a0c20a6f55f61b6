"""Learning-rate schedules against their closed forms (written out independently here)."""

from __future__ import annotations

import itertools
import math

import pytest

from normlab.runs.spec import RunSpec
from normlab.train.schedules import lr_at
from normlab.utils.config import ConfigError

T = 100


def spec(**changes) -> RunSpec:
    return RunSpec(**{"lr": 0.4, "warmup": 0.0, **changes})


def test_constant_is_the_peak_everywhere():
    s = spec(schedule="constant")
    assert [lr_at(k, T, s) for k in (0, 37, 99)] == [0.4, 0.4, 0.4]


def test_step_divides_at_the_milestone_fractions():
    s = spec(schedule="step", milestones=(0.5, 0.75), lr_decay=0.1)
    expected = {0: 0.4, 49: 0.4, 50: 0.04, 74: 0.04, 75: 0.004, 99: 0.004}
    for k, lr in expected.items():
        assert lr_at(k, T, s) == pytest.approx(lr, rel=1e-12), k


def test_cosine_is_half_a_cosine_over_the_run():
    s = spec(schedule="cosine")
    for k in (0, 1, 25, 50, 99):
        assert lr_at(k, T, s) == pytest.approx(0.2 * (1 + math.cos(math.pi * k / T)), rel=1e-12)


def test_one_cycle_rises_falls_and_anneals():
    s = spec(schedule="one_cycle")  # peak at 45 %, floor lr/25, end lr/2500
    assert lr_at(0, T, s) == pytest.approx(0.4 / 25)
    assert lr_at(45, T, s) == pytest.approx(0.4)
    assert lr_at(90, T, s) == pytest.approx(0.4 / 25)
    t = 0.225  # half of the rise
    assert lr_at(225, 1000, s) == pytest.approx(0.4 / 25 + (0.4 - 0.4 / 25) * t / 0.45)
    # annihilation: linear from lr/25 at 90 % to lr/2500 at 100 %
    assert lr_at(95, T, s) == pytest.approx((0.4 / 25 + 0.4 / 2500) / 2)
    values = [lr_at(k, T, s) for k in range(T)]
    assert values.index(max(values)) == 45
    assert all(a < b for a, b in itertools.pairwise(values[:46]))
    assert all(a > b for a, b in itertools.pairwise(values[45:]))


def test_one_cycle_options_set_peak_and_floor():
    s = spec(schedule="one_cycle", options={"one_cycle_peak": 0.25, "one_cycle_div": 10.0})
    assert lr_at(25, T, s) == pytest.approx(0.4)
    assert lr_at(0, T, s) == pytest.approx(0.04)
    assert lr_at(50, T, s) == pytest.approx(0.04)


@pytest.mark.parametrize(("options", "name"), [({"one_cycle_div": 0.5}, "one_cycle_div"),
                                               ({"one_cycle_peak": 0.7}, "one_cycle_peak")])
def test_bad_one_cycle_options_are_named(options, name):
    with pytest.raises(ConfigError, match=name):
        lr_at(0, T, spec(schedule="one_cycle", options=options))


def test_warmup_is_linear_then_hands_over_to_the_shape():
    s = spec(schedule="step", warmup=0.1, milestones=(0.5,), lr_decay=0.1)  # W = 10 steps
    assert lr_at(0, T, s) == pytest.approx(0.04)
    assert lr_at(4, T, s) == pytest.approx(0.2)
    assert lr_at(9, T, s) == pytest.approx(0.4)
    assert lr_at(10, T, s) == pytest.approx(0.4)
    assert lr_at(60, T, s) == pytest.approx(0.04)
    c = spec(schedule="cosine", warmup=0.1)
    assert lr_at(4, T, c) == pytest.approx(0.5 * 0.2 * (1 + math.cos(math.pi * 0.04)))


@pytest.mark.parametrize(("step", "total"), [(-1, 10), (10, 10), (0, 0)])
def test_steps_outside_the_run_are_refused(step, total):
    with pytest.raises(ConfigError):
        lr_at(step, total, spec())
