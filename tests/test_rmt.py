"""Random-matrix probes against ground truth: Fuss-Catalan numbers by quadrature, the
Marchenko-Pastur closed form, seeded sampled spectra, explicit Jacobians, orthogonal networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from cases import assert_unchanged, model_snapshot, tiny_case
from normlab.nn import initialize, mlp
from normlab.probes import (
    fuss_catalan_density,
    fuss_catalan_moment,
    jacobian_singular_values,
    product_singular_values,
)
from normlab.probes.rmt import (
    fuss_catalan_cdf,
    fuss_catalan_singular_value_density,
    fuss_catalan_support,
)
from normlab.utils.config import ConfigError


@pytest.mark.parametrize("M", [1, 2, 3])
def test_density_integrates_to_one_and_has_the_fuss_catalan_moments(M):
    edge = fuss_catalan_support(M)
    for k, known in enumerate([1, 1, M + 1, None]):
        value, _ = integrate.quad(lambda x, k=k: x ** k * fuss_catalan_density(x, M), 0, edge,
                                  limit=200)
        assert value == pytest.approx(fuss_catalan_moment(k, M), rel=1e-6)
        if known is not None:  # E x = 1, E x^2 = M + 1 (written out, not from the function)
            assert fuss_catalan_moment(k, M) == known
    assert [fuss_catalan_moment(k, 2) for k in range(5)] == [1, 1, 3, 12, 55]


def test_one_matrix_is_marchenko_pastur_and_the_quarter_circle():
    x = np.linspace(1e-3, 4 - 1e-3, 41)
    np.testing.assert_allclose(fuss_catalan_density(x, 1), np.sqrt((4 - x) / x) / (2 * np.pi),
                               rtol=1e-9)
    s = np.sqrt(x)
    np.testing.assert_allclose(fuss_catalan_singular_value_density(s, 1),
                               np.sqrt(4 - s ** 2) / np.pi, rtol=1e-9)
    assert np.all(fuss_catalan_density(np.array([-1.0, 0.0, 4.0, 5.0]), 1) == 0)


@pytest.mark.parametrize("M", [1, 3])
def test_cdf_agrees_with_quadrature_of_the_density(M):
    for x in (0.01, 0.5, 1.0, 2.5):
        want, _ = integrate.quad(lambda t: fuss_catalan_density(t, M), 0, x, limit=200)
        assert fuss_catalan_cdf(x, M) == pytest.approx(want, abs=1e-5)
    assert fuss_catalan_cdf(fuss_catalan_support(M) + 1, M) == 1.0
    assert fuss_catalan_cdf(0.0, M) == 0.0


def test_support_edges_match_the_papers_numbers():
    edges = [math.sqrt(fuss_catalan_support(M)) for M in (1, 3, 5)]
    np.testing.assert_allclose(edges, [2.00, 3.08, 3.86], atol=0.005)


@pytest.mark.parametrize("M", [1, 3, 5])
def test_sampled_product_spectra_follow_the_density(M):
    values = product_singular_values(M, 300, seed=M).numpy()
    assert values.shape == (300,) and np.all(np.diff(values) <= 0)
    assert np.mean(values ** 2) == pytest.approx(1.0, abs=0.1)

    ks = stats.kstest(values ** 2, lambda x: fuss_catalan_cdf(x, M)).statistic
    assert ks < 0.05  # eigenvalues repel: finite-N deviations are far below i.i.d. ones


def test_product_draws_are_seeded_and_settings_checked():
    torch.testing.assert_close(product_singular_values(2, 20, 4), product_singular_values(2, 20, 4))
    with pytest.raises(ConfigError, match="'M'"):
        product_singular_values(0, 10)
    with pytest.raises(ConfigError, match="'M'"):
        fuss_catalan_density(1.0, 0)


@pytest.mark.parametrize("method", ["exact", "lanczos", "randomized"])
def test_jacobian_singular_values_match_autograd_jacobian_and_svd(method):
    model = mlp([5, 6, 4, 7], activation="tanh", init="xavier_normal", seed=1).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: model(z).reshape(-1), x).reshape(21, 15)
    want = torch.linalg.svdvals(jac)
    got = jacobian_singular_values(model, x, method=method)
    torch.testing.assert_close(got.values, want, rtol=1e-9, atol=1e-12)
    assert got.shape == (21, 15) and got.method == method and got.bn_mode == "train"


def test_jacobian_through_batchnorm_in_train_mode_includes_the_batch_paths():
    case = tiny_case("batch", batch=4, size=4)
    model = case.model

    def through(z):
        return model(z).reshape(-1)

    jac = torch.autograd.functional.jacobian(through, case.x).reshape(12, -1)
    before = model_snapshot(model)
    got = jacobian_singular_values(model, case.x, method="lanczos")
    assert_unchanged(before, model)
    torch.testing.assert_close(got.values, torch.linalg.svdvals(jac)[:12], rtol=1e-8,
                               atol=1e-10)


def test_jacobian_of_an_inner_layer():
    case = tiny_case("none", batch=2, size=3)
    captured = {}

    def to_conv2(z):
        handle = case.model.conv2.register_forward_hook(
            lambda m, i, o: captured.update(out=o))
        case.model(z)
        handle.remove()
        return captured["out"].reshape(-1)

    jac = torch.autograd.functional.jacobian(to_conv2, case.x).reshape(72, 54)
    got = jacobian_singular_values(case.model, case.x, layer="conv2", method="lanczos")
    torch.testing.assert_close(got.values, torch.linalg.svdvals(jac), rtol=1e-8, atol=1e-10)
    with pytest.raises(ConfigError, match="'layer'"):
        jacobian_singular_values(case.model, case.x, layer="nope")


@pytest.mark.parametrize("init", ["orthogonal", "delta_orthogonal"])
def test_orthogonal_deep_linear_network_is_an_isometry(init):
    model = mlp([16] * 9, activation="linear", bias=False, init=init, seed=0).double()
    initialize(model, init, seed=0)  # again in float64: float32 storage would round W^T W = I
    x = torch.randn(2, 16, dtype=torch.float64)
    got = jacobian_singular_values(model, x, method="lanczos")
    torch.testing.assert_close(got.values, torch.ones(32, dtype=torch.float64), rtol=0,
                               atol=1e-12)


def test_gaussian_deep_linear_network_spreads_its_spectrum():
    model = mlp([64] * 6, activation="linear", bias=False, init="xavier_normal", seed=0).double()
    got = jacobian_singular_values(model, torch.randn(1, 64, dtype=torch.float64), k=64)
    records = {r["quantity"]: r["value"] for r in got.records()
               if r["quantity"] != "singular_value"}
    assert records["max"] > 2.5 and records["condition"] > 100 and records["tiny_share"] > 0.1


def test_exact_refuses_a_huge_jacobian_and_bad_settings():
    model = mlp([4, 3], activation="linear", seed=0).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match="'method'"):
        jacobian_singular_values(model, x, method="svd")
    with pytest.raises(ConfigError, match="'k'"):
        jacobian_singular_values(model, x, k=0)
    big = mlp([2048, 2048], activation="linear", bias=False, seed=0)
    with pytest.raises(ConfigError, match="'exact'"):
        jacobian_singular_values(big, torch.randn(2, 2048), method="exact")
