"""Every probe treats the old call forms alike (issue 17, item 13): accepted with a
DeprecationWarning that shows the new form, or refused with a message that shows it."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from normlab import probes
from normlab.utils.config import ConfigError


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(6, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=gen))


def _direction(model):
    return {n: torch.ones_like(p) for n, p in model.named_parameters()}


# probe name -> (function, options of a call, takes a loss)
PROBES = {
    "per_example_loss_grads": (probes.per_example_loss_grads, {}, True),
    "per_example_contributions": (probes.per_example_contributions, {}, True),
    "gradient_coherence": (probes.gradient_coherence, {}, True),
    "output_gradients": (probes.output_gradients, {}, True),
    "gradient_histogram": (probes.gradient_histogram, {"bins": 4}, True),
    "step_loss": (probes.step_loss, {"steps": [0.0, 0.1]}, True),
    "step_anatomy": (probes.step_anatomy, {"step": 0.1, "layers": [1], "points": 2}, True),
    "radial_tangential": (probes.radial_tangential, {}, True),
    "hessian_eigs": (probes.hessian_eigs, {"k": 1, "max_iter": 10}, True),
    "hessian_trace": (probes.hessian_trace, {"samples": 2}, True),
    "spectral_density": (probes.spectral_density, {"steps": 3}, True),
    "hvp": (probes.hvp, {"vector": "ones"}, True),
    "landscape": (probes.landscape, {"directions": "ones", "points": 3}, True),
    "hessian_direction": (probes.hessian_direction, {}, True),
    "lr_range_test": (probes.lr_range_test, {"steps": 3, "start": 1e-3, "end": 1e-2}, True),
    "activation_stats": (probes.activation_stats, {}, False),
    "jacobian_singular_values": (probes.jacobian_singular_values, {"k": 1}, False),
}


def _options(name: str, model: nn.Module) -> dict:
    options = dict(PROBES[name][1])
    if options.get("vector") == "ones":
        options["vector"] = _direction(model)
    if options.get("directions") == "ones":
        options["directions"] = [_direction(model)]
    return options


def _call(name: str, *args, **kwargs):
    fn, _, takes_loss = PROBES[name]
    model = mlp()
    lead = (model, nn.CrossEntropyLoss()) if takes_loss else (model,)
    return fn(*lead, *args, **_options(name, model), **kwargs)


def _same(a, b) -> None:
    if hasattr(a, "records"):
        a, b = a.records(), b.records()
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k])
        return
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            va, vb = ra[k], rb[k]
            assert va == vb or (isinstance(va, float) and math.isnan(va) and math.isnan(vb)), k


def _new(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return _call(name, batch())


@pytest.mark.parametrize("name", list(PROBES))
def test_x_and_y_as_two_arguments_work_for_every_probe_and_say_the_new_form(name):
    x, y = batch()
    with pytest.warns(DeprecationWarning, match=r"\(x, y\)"):
        old = _call(name, x, y)
    _same(old, _new(name))


@pytest.mark.parametrize("name", list(PROBES))
def test_x_and_y_keywords_work_for_every_probe_and_say_the_new_form(name):
    x, y = batch()
    with pytest.warns(DeprecationWarning, match=r"data=\(x, y\)"):
        old = _call(name, x=x, y=y)
    _same(old, _new(name))


@pytest.mark.parametrize("name", list(PROBES))
def test_bn_mode_works_for_every_probe_as_mode(name):
    with pytest.warns(DeprecationWarning, match="mode="):
        old = _call(name, batch(), bn_mode="eval")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = _call(name, batch(), mode="eval")
    _same(old, new)
    with pytest.raises(ConfigError, match=r"'bn_mode'.*'mode'"):
        _call(name, batch(), bn_mode="eval", mode="train")


@pytest.mark.parametrize("name", [n for n, (_, _, loss) in PROBES.items() if loss])
def test_a_tensor_where_the_loss_goes_is_refused_with_the_call_form(name):
    x, y = batch()
    with pytest.raises(ConfigError, match=rf"'loss_fn'.*{name}\(model, loss_fn, \(x, y\)"):
        PROBES[name][0](mlp(), x, y)


@pytest.mark.parametrize("name", list(PROBES))
def test_too_many_positional_arguments_are_refused_with_the_call_form(name):
    extra = [object()] * 9
    with pytest.raises(TypeError, match=rf"{name}\(model, "):
        _call(name, batch(), *extra)
