"""Normalization layers against closed-form computations, in train and eval mode."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from normlab.nn import (
    BatchRenorm,
    is_batch_coupled,
    list_norms,
    make_norm,
    register_norm,
    resnet_cifar,
    set_training_fraction,
)
from normlab.nn import norms as norms_module
from normlab.probes._hygiene import frozen_norm_statistics
from normlab.utils.config import ConfigError

EPS = 1e-5


def _affine(module: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give the norm a non-trivial per-channel scale and shift; return (gamma, beta)."""
    gamma = torch.linspace(0.5, 2.0, channels, dtype=torch.float64)
    beta = torch.linspace(-1.0, 1.0, channels, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(gamma)
        module.bias.copy_(beta)
    return gamma, beta


def _normalize_groups(x: torch.Tensor, axes_of: Callable) -> torch.Tensor:
    """Brute force: for each index tuple returned by axes_of, normalize that slice of x."""
    out = torch.empty_like(x)
    for index in axes_of(x):
        part = x[index]
        mean = part.sum() / part.numel()
        var = ((part - mean) ** 2).sum() / part.numel()  # biased
        out[index] = (part - mean) / torch.sqrt(var + EPS)
    return out


def _per_channel(c: int, x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.size(1), -1)[c]


@pytest.fixture
def x4() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(5, 4, 3, 3, dtype=torch.float64) * 2.0 + 0.7


def _channel_bcast(v: torch.Tensor, dim: int = 4) -> torch.Tensor:
    return v.view(1, -1, *([1] * (dim - 2)))


def test_none_is_identity(x4):
    assert torch.equal(make_norm("none", 4)(x4), x4)


@pytest.mark.parametrize("shape", [(5, 4, 3, 3), (7, 4)])
def test_batch_train_and_eval_match_closed_form(shape):
    torch.manual_seed(2)
    x = torch.randn(*shape, dtype=torch.float64) * 3.0 + 1.0
    norm = make_norm("batch", 4, bn_momentum=0.25).double()
    gamma, beta = _affine(norm, 4)
    y = norm.train()(x)
    expected = _normalize_groups(x, lambda t: [(slice(None), c) for c in range(4)])
    expected = expected * _channel_bcast(gamma, x.dim()) + _channel_bcast(beta, x.dim())
    torch.testing.assert_close(y, expected)
    # torch convention: running = (1 - m) * running + m * batch; unbiased variance stored.
    n = x.numel() // 4
    mean = torch.stack([_per_channel(c, x).sum() / n for c in range(4)])
    unbiased = torch.stack([((_per_channel(c, x) - mean[c]) ** 2).sum() / (n - 1)
                            for c in range(4)])
    torch.testing.assert_close(norm.running_mean, 0.25 * mean)
    torch.testing.assert_close(norm.running_var, 0.75 * torch.ones(4, dtype=torch.float64)
                               + 0.25 * unbiased)
    y_eval = norm.eval()(x)
    shape_c = (1, -1) + (1,) * (x.dim() - 2)
    expected_eval = ((x - (0.25 * mean).view(shape_c))
                     / torch.sqrt((0.75 + 0.25 * unbiased).view(shape_c) + EPS))
    torch.testing.assert_close(y_eval, expected_eval * gamma.view(shape_c) + beta.view(shape_c))


def test_group_layer_instance_match_closed_form(x4):
    n, c = x4.shape[:2]
    cases = {
        "group": ({"groups": 2}, lambda t: [(i, slice(g * 2, g * 2 + 2)) for i in range(n)
                                            for g in range(2)]),
        "layer": ({}, lambda t: [(i,) for i in range(n)]),
        "instance": ({}, lambda t: [(i, ch) for i in range(n) for ch in range(c)]),
    }
    for kind, (options, axes) in cases.items():
        norm = make_norm(kind, c, **options).double()
        gamma, beta = _affine(norm, c)
        expected = _normalize_groups(x4, axes) * _channel_bcast(gamma) + _channel_bcast(beta)
        torch.testing.assert_close(norm.train()(x4), expected, msg=kind)
        torch.testing.assert_close(norm.eval()(x4), expected, msg=kind)  # no running stats


def test_group_defaults_to_min_32_channels():
    assert make_norm("group", 64).num_groups == 32
    assert make_norm("group", 16).num_groups == 16
    assert make_norm("group", 64, groups=4).num_groups == 4


def test_layer_on_features_is_layernorm():
    torch.manual_seed(3)
    x = torch.randn(6, 10, dtype=torch.float64)
    norm = make_norm("layer", 10).double()
    reference = nn.LayerNorm(10, eps=EPS, elementwise_affine=False).double()
    torch.testing.assert_close(norm(x), reference(x))


def test_instance_refuses_features():
    with pytest.raises(ValueError, match="InstanceNorm"):
        make_norm("instance", 4)(torch.randn(3, 4))


def _torch_bn_pair(channels: int, momentum: float) -> tuple[nn.Module, BatchRenorm]:
    bn = nn.BatchNorm2d(channels, momentum=momentum).double()
    brn = BatchRenorm(channels, bn_momentum=momentum, rmax=1.0, dmax=0.0).double()
    _affine(bn, channels)
    _affine(brn, channels)
    return bn, brn


@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (8, 3)])
def test_batch_renorm_with_unit_limits_is_batchnorm(shape):
    bn, brn = _torch_bn_pair(3, 0.3)
    if len(shape) == 2:
        bn = nn.BatchNorm1d(3, momentum=0.3).double()
        _affine(bn, 3)
    torch.manual_seed(4)
    for step in range(3):  # running stats drift away from (0, 1): r, d would matter if unclipped
        x = torch.randn(*shape, dtype=torch.float64) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        weights = torch.randn(*shape, dtype=torch.float64)
        ya, yb = bn.train()(xa), brn.train()(xb)
        torch.testing.assert_close(yb, ya)
        (ya * weights).sum().backward()
        (yb * weights).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad)
        torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
        torch.testing.assert_close(brn.bias.grad, bn.bias.grad)
        torch.testing.assert_close(brn.running_mean, bn.running_mean)
        torch.testing.assert_close(brn.running_var, bn.running_var)
    assert int(brn.num_batches_tracked) == 3
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(brn.eval()(x), bn.eval()(x))


def test_batch_renorm_relaxed_matches_formula():
    torch.manual_seed(5)
    x = torch.randn(10, 3, 2, 2, dtype=torch.float64) * torch.tensor([1.0, 4.0, 0.2]).view(
        1, 3, 1, 1).double() + torch.tensor([0.0, 0.0, 9.0]).view(1, 3, 1, 1).double()
    brn = BatchRenorm(3, rmax=2.0, dmax=1.5, bn_momentum=0.1, renorm_warmup=(0.0, 0.0)).double()
    gamma, beta = _affine(brn, 3)
    # running stats chosen so channel 0 is unclipped, 1 hits rmax, 2 hits 1/rmax and dmax
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.0]))
        brn.running_var.copy_(torch.tensor([1.2, 1.0, 1.0]))
    run_mean, run_var = brn.running_mean.clone(), brn.running_var.clone()
    xg = x.clone().requires_grad_()
    y = brn.train()(xg)
    for c in range(3):
        values = x[:, c].flatten()
        mu = values.mean()
        sigma_b = torch.sqrt(((values - mu) ** 2).mean() + EPS)
        sigma = torch.sqrt(run_var[c] + EPS)
        r = min(max(float(sigma_b / sigma), 0.5), 2.0)
        d = min(max(float((mu - run_mean[c]) / sigma), -1.5), 1.5)
        expected = ((x[:, c] - mu) / sigma_b * r + d) * gamma[c] + beta[c]
        torch.testing.assert_close(y[:, c], expected)
        if c == 1:
            assert r == 2.0
        if c == 2:
            assert r == 0.5 and d == 1.5
    # r, d are stop-gradient: the input gradient is r times BatchNorm's
    weights = torch.randn_like(x)
    (y * weights).sum().backward()
    bn = nn.BatchNorm2d(3).double()
    _affine(bn, 3)
    xb = x.clone().requires_grad_()
    (bn.train()(xb) * weights).sum().backward()
    sigma_b = torch.sqrt(x.var((0, 2, 3), unbiased=False) + EPS)
    r = (sigma_b / torch.sqrt(run_var + EPS)).clamp(0.5, 2.0)
    torch.testing.assert_close(xg.grad, xb.grad * r.view(1, 3, 1, 1))
    # eval mode: the running statistics only
    y_eval = brn.eval()(x)
    expected_eval = ((x - brn.running_mean.view(1, 3, 1, 1))
                     / torch.sqrt(brn.running_var.view(1, 3, 1, 1) + EPS))
    torch.testing.assert_close(y_eval, expected_eval * gamma.view(1, 3, 1, 1)
                               + beta.view(1, 3, 1, 1))


def test_batch_renorm_warmup_schedule():
    brn = BatchRenorm(2, rmax=3.0, dmax=5.0, renorm_warmup=(0.2, 0.6))
    expected = {0.0: (1.0, 0.0), 0.2: (1.0, 0.0), 0.4: (2.0, 2.5), 0.6: (3.0, 5.0),
                1.0: (3.0, 5.0)}
    for fraction, limits in expected.items():
        brn.set_training_fraction(fraction)
        assert brn.current_limits() == pytest.approx(limits)
    step = BatchRenorm(2, renorm_warmup=(0.5, 0.5))
    assert step.current_limits() == (1.0, 0.0)
    step.set_training_fraction(0.5)
    assert step.current_limits() == (3.0, 5.0)
    assert BatchRenorm(2).current_limits() == (1.0, 0.0)  # default warm-up: starts as BatchNorm
    assert BatchRenorm(2, renorm_warmup=(0, 0)).current_limits() == (3.0, 5.0)  # final at once
    with pytest.raises(ConfigError, match="training fraction"):
        brn.set_training_fraction(1.5)


def test_forward_follows_the_schedule():
    """Before the warm-up the layer is BatchNorm; after it, the relaxed r, d apply."""
    torch.manual_seed(10)
    brn = BatchRenorm(2, rmax=3.0, dmax=5.0, renorm_warmup=(0.2, 0.6)).double()
    bn = nn.BatchNorm2d(2).double()
    with torch.no_grad():
        for layer in (brn, bn):
            layer.running_mean.fill_(2.0)
            layer.running_var.fill_(0.25)
    x = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    with frozen_norm_statistics(brn), frozen_norm_statistics(bn):
        expected_bn = bn.train()(x)
        brn.set_training_fraction(0.1)
        torch.testing.assert_close(brn.train()(x), expected_bn)
        brn.set_training_fraction(1.0)
        relaxed = brn.train()(x)
    # unclipped (sigma_B / sigma < 3 and |mu_B - mu| / sigma < 5): the running-stat normalization
    torch.testing.assert_close(relaxed, (x - 2.0) / torch.sqrt(torch.tensor(0.25 + EPS)))


def test_set_training_fraction_reaches_every_layer():
    model = resnet_cifar(8, norm="batch_renorm", norm_options={"renorm_warmup": (0.0, 1.0)},
                         width=4, seed=0)
    set_training_fraction(model, 0.5)
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm)]
    assert len(layers) == 7
    assert all(m.current_limits() == (2.0, 2.5) for m in layers)


def test_batch_renorm_running_stats_survive_state_dict():
    torch.manual_seed(6)
    brn = BatchRenorm(3, rmax=2.0, dmax=1.0, renorm_warmup=(0, 0))
    for _ in range(4):
        brn.train()(torch.randn(8, 3, 2, 2) * 3 + 1)
    state = brn.state_dict()
    assert {"running_mean", "running_var", "num_batches_tracked"} <= set(state)
    fresh = BatchRenorm(3, rmax=2.0, dmax=1.0, renorm_warmup=(0, 0))
    fresh.load_state_dict(state)
    for name in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
        assert torch.equal(getattr(fresh, name), getattr(brn, name))
    assert not torch.equal(fresh.running_var, torch.ones(3))
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(fresh.eval()(x), brn.eval()(x))


def test_zero_momentum_freezes_running_stats():
    model = nn.Sequential(make_norm("batch_renorm", 3), make_norm("batch", 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen_norm_statistics(model):
        model.train()(torch.randn(6, 3, 2, 2) * 5 + 2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", list_norms())
def test_is_batch_coupled_matches_behaviour(kind):
    """Ground truth: example 1's output has a nonzero derivative w.r.t. example 0 iff coupled.

    (BatchRenorm's forward value can be batch-independent when r, d are unclipped, but its
    gradient flows through the batch statistics, so it is coupled.)
    """
    options = {"groups": 2} if kind == "group" else {}
    norm = make_norm(kind, 4, **options).double()
    torch.manual_seed(7)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    for mode in (True, False):
        norm.train(mode)
        xg = x.clone().requires_grad_()
        with frozen_norm_statistics(norm):
            (norm(xg)[1] * torch.randn(4, 3, 3, dtype=torch.float64)).sum().backward()
        coupled = xg.grad is not None and bool(xg.grad[0].abs().max() > 1e-12)
        assert is_batch_coupled(norm, x) == coupled, (kind, mode)
    model = resnet_cifar(8, norm=kind, width=4, norm_options=options or None)
    images = torch.randn(5, 3, 8, 8)
    assert is_batch_coupled(model.train(), images) == (kind in ("batch", "batch_renorm"))
    assert not is_batch_coupled(model.eval(), images)


@pytest.mark.parametrize("kind", list_norms())
def test_every_registered_norm_shapes_gradients_finite(kind):
    """Runs for every registered norm, so a new norm is checked without a new test."""
    norm = make_norm(kind, 4).double()
    torch.manual_seed(8)
    x = (torch.randn(6, 4, 5, 5, dtype=torch.float64) * 3.0).requires_grad_()
    y = norm.train()(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in norm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        y_eval = norm.eval()(x)
    assert y_eval.shape == x.shape and torch.isfinite(y_eval).all()
    assert norm.training is False


def test_unknown_kind_lists_allowed():
    with pytest.raises(ConfigError) as err:
        make_norm("weight", 4)
    message = str(err.value)
    assert "'norm'" in message and "'weight'" in message
    assert all(repr(kind) in message for kind in list_norms())


def test_unknown_option_is_refused():
    with pytest.raises(ConfigError, match="'groups'") as err:
        make_norm("batch", 4, groups=2)
    assert "'eps'" in str(err.value) and "'bn_momentum'" in str(err.value)
    with pytest.raises(ConfigError, match="'rmax'"):
        make_norm("none", 4, rmax=2.0)


@pytest.mark.parametrize("options", [{"groups": 5}, {}])
def test_groups_must_divide_channels(options):
    with pytest.raises(ConfigError, match="'groups'") as err:
        make_norm("group", 48, **options)
    assert "48" in str(err.value)


@pytest.mark.parametrize("kind, options, setting", [
    ("batch", {"eps": 0.0}, "'eps'"),
    ("group", {"groups": 0}, "'groups'"),
    ("batch", {"bn_momentum": 1.5}, "'bn_momentum'"),
    ("batch_renorm", {"rmax": 0.5}, "'rmax'"),
    ("batch_renorm", {"dmax": -1.0}, "'dmax'"),
    ("batch_renorm", {"renorm_warmup": (0.6, 0.2)}, "'renorm_warmup'"),
    ("batch_renorm", {"renorm_warmup": 0.5}, "'renorm_warmup'"),
])
def test_bad_option_values_are_refused(kind, options, setting):
    with pytest.raises(ConfigError, match=setting):
        make_norm(kind, 4, **options)


def test_register_norm_adds_kind_and_refuses_duplicates():
    @register_norm("_test_scale")
    def _scale(channels: int, *, factor: float = 2.0) -> nn.Module:
        layer = nn.Conv2d(channels, channels, 1, bias=False)
        nn.init.eye_(layer.weight[:, :, 0, 0])
        layer.weight.data *= factor
        return layer

    try:
        assert "_test_scale" in list_norms()
        assert torch.allclose(make_norm("_test_scale", 2, factor=3.0)(torch.ones(1, 2, 1, 1)),
                              torch.full((1, 2, 1, 1), 3.0))
        with pytest.raises(ConfigError, match="'bogus'"):
            make_norm("_test_scale", 2, bogus=1)
        with pytest.raises(ValueError, match="already registered"):
            register_norm("_test_scale")(_scale)
    finally:
        norms_module._NORMS._entries.pop("_test_scale")


def test_callable_kind():
    layer = make_norm(lambda c, eps=1e-3: nn.GroupNorm(1, c, eps=eps), 4, eps=1e-2)
    assert isinstance(layer, nn.GroupNorm) and layer.eps == 1e-2


def test_batch_renorm_half_precision_uses_float32_statistics():
    torch.manual_seed(9)
    x = torch.randn(16, 3, 4, 4) * 2 + 5
    full = BatchRenorm(3, rmax=2.0, dmax=1.0, renorm_warmup=(0, 0))
    half = BatchRenorm(3, rmax=2.0, dmax=1.0, renorm_warmup=(0, 0))
    y = half.train()(x.bfloat16())
    assert y.dtype == torch.bfloat16 and half.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), full.train()(x), atol=0.05, rtol=0.02)
    torch.testing.assert_close(half.running_var, full.running_var, atol=0.05, rtol=0.02)
