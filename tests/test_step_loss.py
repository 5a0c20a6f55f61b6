"""step_loss and step_anatomy against explicit moves of a copy of the model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cases import tiny_case
from normlab.probes import activation_stats, step_anatomy, step_loss
from normlab.probes._hygiene import frozen_norm_statistics
from normlab.utils.config import ConfigError


def moved_copy(case, step: float):
    """A copy of the model moved to theta - step * g (g: its mini-batch gradient)."""
    model = copy.deepcopy(case.model)
    with frozen_norm_statistics(model):
        loss = case.loss_fn(model(case.x), case.y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads, strict=True):
            p.sub_(step * g)
    return model


def loss_of(model, loss_fn, x, y) -> float:
    with frozen_norm_statistics(model), torch.no_grad():
        return float(loss_fn(model(x), y))


def test_probe_functions_are_not_shadowed_by_their_modules():
    import normlab.probes.step_loss as module  # noqa: F401
    from normlab import probes

    assert callable(probes.step_loss) and probes.step_loss is step_loss


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_relative_loss_equals_explicit_move(norm):
    case = tiny_case(norm)
    held_x, held_y = torch.randn_like(case.x), case.y.flip(0)
    steps = [0.0, 1e-2, 0.5]
    records = step_loss(case.model, case.loss_fn, (case.x, case.y), steps=steps,
                        eval_batch=(held_x, held_y))
    assert len(records) == 2 * len(steps)
    start = loss_of(case.model, case.loss_fn, case.x, case.y)
    start_held = loss_of(case.model, case.loss_fn, held_x, held_y)
    for r in records:
        moved = moved_copy(case, r["step_size"])
        x, y, base = (case.x, case.y, start) if r["batch"] == "same" else (held_x, held_y,
                                                                              start_held)
        assert r["value"] == pytest.approx(loss_of(moved, case.loss_fn, x, y) / base, rel=1e-9)
        assert r["bn_mode"] == "train" and r["direction"] == "batch_gradient"
        assert r["threshold"] == 1e3
    assert [r["value"] for r in records if r["step_size"] == 0.0] == pytest.approx([1.0, 1.0])


def test_given_direction_and_eval_mode():
    case = tiny_case("batch")
    direction = {"fc.bias": torch.ones(3, dtype=torch.float64)}
    (record,) = step_loss(case.model, case.loss_fn, (case.x, case.y), direction=direction,
                          steps=[0.3], mode="eval")
    model = copy.deepcopy(case.model).eval()
    base = loss_of(model, case.loss_fn, case.x, case.y)
    with torch.no_grad():
        model.fc.bias.sub_(0.3)
    assert record["value"] == pytest.approx(loss_of(model, case.loss_fn, case.x, case.y) / base)
    assert record["bn_mode"] == "eval" and record["direction"] == "given"
    assert record["direction_norm"] == pytest.approx(math.sqrt(3))
    assert case.model.training  # the mode is restored


def test_divergence_is_flagged_above_the_threshold():
    case = tiny_case("none")
    records = step_loss(case.model, case.loss_fn, (case.x, case.y), steps=[0.0, 1e4],
                        threshold=2.0)
    assert [r["diverged"] for r in records] == [False, True]


@pytest.mark.parametrize("setting,kwargs", [
    ("mode", {"mode": "test"}), ("steps", {"steps": [-1.0]}),
    ("steps", {"steps": [float("nan")]}), ("threshold", {"threshold": 0}),
    ("direction", {"direction": {"nope": torch.zeros(1)}})])
def test_bad_settings_are_refused(setting, kwargs):
    case = tiny_case("none")
    with pytest.raises(ConfigError, match=setting):
        step_loss(case.model, case.loss_fn, (case.x, case.y), **kwargs)


def test_default_grid_is_the_papers():
    case = tiny_case("none")
    records = step_loss(case.model, case.loss_fn, (case.x, case.y))
    sizes = [r["step_size"] for r in records]
    assert len(sizes) == 41 and sizes[0] == pytest.approx(1e-5) and sizes[-1] == pytest.approx(0.1)


def test_anatomy_ends_equal_activation_stats_at_both_ends():
    case = tiny_case("none")
    records = step_anatomy(case.model, case.loss_fn, (case.x, case.y), step=0.7,
                           layers=["conv2"], points=3)
    fractions = sorted({r["fraction"] for r in records})
    assert fractions == pytest.approx([0.0, 0.5, 1.0])
    for fraction, model in ((0.0, case.model), (1.0, moved_copy(case, 0.7))):
        want = {(r["channel"], r["quantity"]): r["value"]
                for r in activation_stats(model, case.x, layers=["conv2"])}
        got = {(r["channel"], r["quantity"]): r["value"] for r in records
               if r["fraction"] == fraction and r["layer"] == "conv2"}
        assert got == pytest.approx(want, rel=1e-9)
    losses = [r for r in records if r["quantity"] == "loss"]
    assert len(losses) == 3


def test_anatomy_refuses_bad_points():
    case = tiny_case("none")
    with pytest.raises(ConfigError, match="points"):
        step_anatomy(case.model, case.loss_fn, (case.x, case.y), step=0.1, layers=[1], points=1)
