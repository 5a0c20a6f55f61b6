"""SGD noise (eq. 2) against brute force: every batch of a tiny data set enumerated."""

from __future__ import annotations

import itertools

import pytest
import torch

from normlab.probes import sgd_noise, sgd_noise_exact
from normlab.utils.config import ConfigError


def linear_regression_grads(n: int = 7, d: int = 3, seed: int = 0) -> torch.Tensor:
    """Per-example gradients of ell_i = (w.x_i - y_i)^2 / 2, known in closed form:
    g_i = (w.x_i - y_i) x_i."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    return (x @ w - y)[:, None] * x


def enumerated_noise(grads: torch.Tensor, b: int) -> float:
    """E ||g_B - g||^2 as the average over every one of the C(N, b) batches."""
    full = grads.mean(dim=0)
    values = [(grads[list(batch)].mean(dim=0) - full).square().sum()
              for batch in itertools.combinations(range(grads.shape[0]), b)]
    return float(torch.stack(values).mean())


def test_per_example_gradients_of_the_linear_model_are_the_autograd_ones():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(7, generator=gen, dtype=torch.float64)
    w = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_(True)
    rows = [torch.autograd.grad((w @ x[i] - y[i]) ** 2 / 2, w)[0] for i in range(7)]
    torch.testing.assert_close(torch.stack(rows), linear_regression_grads())


@pytest.mark.parametrize("b", [1, 2, 3, 5, 7])
def test_exact_formula_equals_the_enumerated_expectation(b):
    grads = linear_regression_grads()
    assert sgd_noise_exact(grads, b) == pytest.approx(enumerated_noise(grads, b), rel=1e-12)


def test_formula_uses_the_population_normalization_and_accepts_mappings():
    grads = linear_regression_grads(n=6)
    n = 6
    c_hat = float((grads - grads.mean(0)).square().sum(1).sum()) / n
    assert sgd_noise_exact(grads, 2) == pytest.approx((n - 2) / (2 * (n - 1)) * c_hat)
    split = {"w": grads[:, :2].reshape(6, 2, 1), "b": grads[:, 2]}
    assert sgd_noise_exact(split, 2) == pytest.approx(sgd_noise_exact(grads, 2))
    assert sgd_noise_exact(grads, n) == pytest.approx(0.0, abs=1e-15)
    assert sgd_noise_exact(grads, 1) == pytest.approx(c_hat)  # b = 1: the variance itself


def test_monte_carlo_estimate_agrees_with_the_enumeration():
    grads = linear_regression_grads(n=9)
    records = sgd_noise(grads, [1, 3, 8], samples=4000, seed=1)
    for b in (1, 3, 8):
        row = {r["quantity"]: r for r in records if r["batch_size"] == b}
        want = enumerated_noise(grads, b)
        assert row["noise_exact"]["value"] == pytest.approx(want, rel=1e-12)
        est = row["noise_estimate"]
        assert abs(est["value"] - want) < 4 * est["stderr"]
        assert row["noise_bound"]["value"] >= want


def test_estimate_is_seeded_and_settings_checked():
    grads = linear_regression_grads()
    assert sgd_noise(grads, [2], samples=10, seed=3) == sgd_noise(grads, [2], samples=10, seed=3)
    with pytest.raises(ConfigError, match="'batch_size'"):
        sgd_noise(grads, [8])
    with pytest.raises(ConfigError, match="'batch_size'"):
        sgd_noise_exact(grads, 0)
    with pytest.raises(ConfigError, match="'samples'"):
        sgd_noise(grads, [2], samples=1)
    with pytest.raises(ConfigError, match="per_example_grads"):
        sgd_noise_exact(grads[:1], 1)
