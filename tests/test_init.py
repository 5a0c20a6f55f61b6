"""Initialization schemes against their defining formulas and invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.nn import init as init_module
from normlab.nn import initialize, list_inits, mlp, register_init, resnet_cifar, weight_sampler
from normlab.utils.config import ConfigError


def _init_one(layer: nn.Module, scheme: str, gain: float = 1.0, seed: int = 0) -> torch.Tensor:
    initialize(nn.Sequential(layer), scheme, gain=gain, seed=seed)
    return layer.weight.detach()


@pytest.mark.parametrize("shape", [(5, 8), (8, 5), (6, 4, 3, 3), (4, 6, 3, 3)])
def test_orthogonal_rows_or_columns_orthonormal(shape):
    layer = (nn.Linear(shape[1], shape[0]) if len(shape) == 2
             else nn.Conv2d(shape[1], shape[0], shape[2])).double()
    w = _init_one(layer, "orthogonal", gain=1.0).reshape(shape[0], -1)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T  # the smaller Gram matrix
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=torch.float64))
    w2 = _init_one(layer, "orthogonal", gain=2.0).reshape(shape[0], -1)
    gram2 = w2.T @ w2 if w2.shape[0] >= w2.shape[1] else w2 @ w2.T
    torch.testing.assert_close(gram2, 4.0 * torch.eye(gram2.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("c_in, c_out", [(6, 6), (3, 7)])
def test_delta_orthogonal_circular_conv_preserves_norm(c_in, c_out):
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="circular", bias=False).double()
    w = _init_one(conv, "delta_orthogonal", seed=3)
    off_centre = w.clone()
    off_centre[:, :, 1, 1] = 0.0
    assert torch.count_nonzero(off_centre) == 0
    centre = w[:, :, 1, 1]
    torch.testing.assert_close(centre.T @ centre, torch.eye(c_in, dtype=torch.float64))
    torch.manual_seed(0)
    for scale in (1e-3, 1.0, 50.0):
        x = torch.randn(4, c_in, 5, 7, dtype=torch.float64) * scale
        y = conv(x)
        torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))


def test_delta_orthogonal_refuses_narrowing_conv_and_even_kernel():
    model = nn.Sequential()
    model.add_module("squeeze", nn.Conv2d(8, 4, 3))
    with pytest.raises(ConfigError, match="'squeeze'") as err:
        initialize(model, "delta_orthogonal")
    assert "c_in=8 > c_out=4" in str(err.value)
    even = nn.Sequential()
    even.add_module("even", nn.Conv2d(2, 2, 2))
    with pytest.raises(ConfigError, match="'even'"):
        initialize(even, "delta_orthogonal")


def test_delta_orthogonal_linear_head_is_semi_orthogonal():
    model = resnet_cifar(8, init="delta_orthogonal", width=8, num_classes=5, seed=0).double()
    w = model.head.fc.weight.detach()  # (5, 32): narrowing linear layers get orthogonal rows
    torch.testing.assert_close(w @ w.T, torch.eye(5, dtype=torch.float64))


# scheme -> weight variance at gain 1 as a function of (fan_in, fan_out, c_out): the papers'
# formulas; an orthogonal (c_out, fan_in) matrix has min(c_out, fan_in) unit rows or columns.
VARIANCE_FORMULAS = {
    "xavier_normal": lambda fi, fo, c_out: 2.0 / (fi + fo),
    "xavier_uniform": lambda fi, fo, c_out: 6.0 / (fi + fo) / 3.0,  # U(-a, a): variance a^2/3
    "kaiming_normal": lambda fi, fo, c_out: 2.0 / fi,
    "kaiming_normal_fan_out": lambda fi, fo, c_out: 2.0 / fo,
    "orthogonal": lambda fi, fo, c_out: 1.0 / max(fi, c_out),
}


@pytest.mark.parametrize("scheme", sorted(VARIANCE_FORMULAS))
@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_empirical_variance_matches_formula(scheme, layer_kind):
    if layer_kind == "linear":
        layer, fan_in, fan_out = nn.Linear(300, 120), 300, 120
    else:
        layer, fan_in, fan_out = nn.Conv2d(24, 40, 3), 24 * 9, 40 * 9
    gain = 1.5
    w = _init_one(layer, scheme, gain=gain, seed=1).double()
    expected = gain**2 * VARIANCE_FORMULAS[scheme](fan_in, fan_out, layer.weight.shape[0])
    # relative std of a variance estimate from n Gaussian draws is sqrt(2/n) (< 4 % here)
    assert w.var().item() == pytest.approx(expected, rel=0.1)
    assert abs(w.mean().item()) < 4 * math.sqrt(expected / w.numel())
    if scheme == "xavier_uniform":
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max() <= bound and w.abs().max() > 0.98 * bound


def test_biases_zero_norms_reset():
    model = resnet_cifar(8, norm="batch", width=4, seed=0)
    model_nb = resnet_cifar(8, norm="none", width=4, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.0)
        model.stem.norm.running_mean.fill_(3.0)
    initialize(model, "xavier_normal", seed=2)
    initialize(model_nb, "xavier_normal", seed=2)
    for name, p in model_nb.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
    assert torch.equal(model.stem.norm.weight, torch.ones(4))
    assert torch.equal(model.stem.norm.bias, torch.zeros(4))
    assert torch.equal(model.stem.norm.running_mean, torch.zeros(4))
    assert torch.count_nonzero(model.head.fc.bias) == 0


def test_seeded_init_is_deterministic_and_leaves_global_rng():
    a = nn.Linear(20, 10)
    b = nn.Linear(20, 10).double()
    state = torch.get_rng_state()
    for scheme in list_inits():
        initialize(a, scheme, seed=5)
        initialize(b, scheme, seed=5)
        if scheme != "torch_default":  # reset_parameters draws in the layer's own dtype
            torch.testing.assert_close(a.weight, b.weight.float())  # same draws in any dtype
        assert torch.equal(torch.get_rng_state(), state), scheme
        first = a.weight.clone()
        initialize(a, scheme, seed=6)
        assert not torch.equal(first, a.weight), scheme


def test_unseeded_init_uses_global_rng():
    layer = nn.Linear(10, 10)
    torch.manual_seed(11)
    initialize(layer, "kaiming_normal")
    first = layer.weight.clone()
    torch.manual_seed(11)
    initialize(layer, "kaiming_normal")
    assert torch.equal(first, layer.weight)


def test_torch_default_reruns_reset_parameters():
    layer = nn.Linear(50, 40)
    initialize(layer, "torch_default", seed=0)
    bound = 1.0 / math.sqrt(50)  # kaiming_uniform(a=sqrt(5)) and the bias both use 1/sqrt(fan_in)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound
    assert torch.count_nonzero(layer.bias) == 40


def test_unknown_scheme_lists_allowed():
    with pytest.raises(ConfigError) as err:
        initialize(nn.Linear(2, 2), "lecun")
    message = str(err.value)
    assert "'init'" in message and "'lecun'" in message
    assert all(repr(name) in message for name in list_inits())


def test_bad_gain_refused():
    with pytest.raises(ConfigError, match="'init_gain'"):
        initialize(nn.Linear(2, 2), "orthogonal", gain=-1.0)


def test_register_init_custom_scheme():
    @register_init("_test_constant")
    @weight_sampler
    def _constant(name, shape, gain, generator):
        return torch.full(shape, 0.25 * gain, dtype=torch.float64)

    try:
        layer = initialize(nn.Linear(3, 2), "_test_constant", gain=2.0)
        assert torch.equal(layer.weight, torch.full((2, 3), 0.5))
        assert torch.count_nonzero(layer.bias) == 0
    finally:
        init_module._INITS._entries.pop("_test_constant")


@pytest.mark.parametrize("scheme", list_inits())
def test_every_registered_init_gives_finite_trainable_models(scheme):
    """Runs for every registered scheme, so a new one is checked without a new test."""
    for model in (resnet_cifar(8, norm="batch", init=scheme, width=4, in_channels=1, seed=0),
                  mlp([16, 8, 8], activation="tanh", init=scheme, num_classes=3, seed=0)):
        x = torch.randn(4, 1, 4, 4)
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
