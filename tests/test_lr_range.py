"""LR range test on a noisy quadratic whose top eigenvalue is known: the edge lands at 2/lambda."""

import math

import pytest
import torch
from torch import nn

from cases import assert_unchanged, model_snapshot, tiny_case
from normlab.probes import lr_range_test
from normlab.probes.lr_range import lr_schedule
from normlab.utils.config import ConfigError

EIGENVALUES = [10.0, 3.0, 1.0, 0.5]  # lambda_max = 10: gradient descent is stable for lr < 0.2


class NoisyQuadratic(nn.Module):
    """L(theta) = 1/2 (theta - xi)^T A (theta - xi), with a fresh xi in every batch (SGD noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("A", torch.diag(torch.tensor(EIGENVALUES, dtype=torch.float64)))
        self.theta = nn.Parameter(torch.ones(len(EIGENVALUES), dtype=torch.float64))

    def forward(self, xi: torch.Tensor) -> torch.Tensor:
        d = self.theta - xi[0]
        return 0.5 * d @ self.A @ d


def _loss(output, _target):
    return output


def _loader(n=64):
    generator = torch.Generator().manual_seed(0)
    return [(0.1 * torch.randn(1, len(EIGENVALUES), generator=generator, dtype=torch.float64),
             torch.zeros(1)) for _ in range(n)]


def test_range_test_finds_the_stability_edge_of_a_quadratic():
    edge = 2 / max(EIGENVALUES)
    result = lr_range_test(NoisyQuadratic(), _loss, _loader(), start=1e-3, end=10, steps=200,
                           smoothing=0.9)
    assert edge / 1.5 < result.lr_at_min < edge * 1.5
    assert result.diverged_lr is not None and edge < result.diverged_lr < 2 * edge
    assert result.suggested_lr == result.lr_steepest < result.lr_at_min
    assert len(result.lrs) < 200  # stopped at divergence


def test_a_tiny_sweep_finds_the_same_edge():
    # brute force: constant-lr SGD for many steps; stable iff the loss stays bounded
    edge = 2 / max(EIGENVALUES)
    stable = []
    for lr in [edge * f for f in (0.5, 0.8, 0.95, 1.05, 1.25, 2.0)]:
        model, loader = NoisyQuadratic(), _loader()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for step in range(300):
            optimizer.zero_grad()
            loss = model(loader[step % len(loader)][0])
            loss.backward()
            optimizer.step()
        final = float(loss.detach())
        if math.isfinite(final) and final < 1e3:
            stable.append(lr)
    assert max(stable) == pytest.approx(0.95 * edge)
    result = lr_range_test(NoisyQuadratic(), _loss, _loader(), start=1e-3, end=10, steps=200,
                           smoothing=0.9)
    assert max(stable) / 1.5 < result.lr_at_min < max(stable) * 1.5


def test_schedules():
    assert lr_schedule(1e-3, 1, 4) == pytest.approx([1e-3, 1e-2, 1e-1, 1])
    assert lr_schedule(0.1, 0.4, 4, "linear") == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_linear_ramp_and_records():
    result = lr_range_test(NoisyQuadratic(), _loss, _loader(), start=0.01, end=0.5, steps=50,
                           ramp="linear", smoothing=0.5)
    rows = result.records()
    assert [r["lr"] for r in rows if r["quantity"] == "loss"] == result.lrs
    assert {r["quantity"] for r in rows} >= {"lr_at_min", "suggested_lr", "diverged_lr"}


def test_model_is_restored():
    case = tiny_case("batch")
    before = model_snapshot(case.model)
    lr_range_test(case.model, case.loss_fn, [(case.x, case.y)], start=1e-3, end=1, steps=5,
                  momentum=0.9)
    assert_unchanged(before, case.model)


def test_bad_settings_are_named():
    model = NoisyQuadratic()
    with pytest.raises(ConfigError, match="ramp"):
        lr_range_test(model, _loss, _loader(), ramp="cosine")
    with pytest.raises(ConfigError, match="end"):
        lr_range_test(model, _loss, _loader(), start=1.0, end=0.5)
    with pytest.raises(ConfigError, match="smoothing"):
        lr_range_test(model, _loss, _loader(), smoothing=1.0)
    with pytest.raises(ConfigError, match="'data'"):
        lr_range_test(model, _loss, [])
