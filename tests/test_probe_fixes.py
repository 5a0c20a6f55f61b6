"""The probes at the edges of real user models (issue 12's items) and the vmap fallback."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cases import tiny_case
from normlab import probes
from normlab.probes.curvature import hessian_operator
from normlab.probes.lr_range import _read_curve
from normlab.utils.config import ConfigError


def dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()


def batch(n: int = 8, features: int = 4, classes: int = 3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, features, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=gen)


# -- modes ----------------------------------------------------------------------------------------

def test_train_mode_never_switches_dropout_on():
    model, data = dropout_mlp().train(), batch()
    values = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        values.append(probes.hessian_eigs(model, nn.CrossEntropyLoss(), data, tol=1e-10,
                                          max_iter=60).values[0])
    evaluated = probes.hessian_eigs(model, nn.CrossEntropyLoss(), data, mode="eval", tol=1e-10,
                                    max_iter=60)
    assert values[0] == pytest.approx(values[1], rel=1e-9)
    assert values[0] == pytest.approx(evaluated.values[0], rel=1e-9)
    rows = probes.landscape(model, nn.CrossEntropyLoss(), data, directions=[
        probes.random_direction(model)], span=1.0, points=3)
    with torch.no_grad():
        own = float(nn.CrossEntropyLoss()(model.eval()(data[0]), data[1]))
    assert [r["value"] for r in rows if r["alpha"] == 0.0] == pytest.approx([own], rel=1e-12)
    assert {r["mode"] for r in rows} == {"train"}


def test_keep_mode_respects_a_users_frozen_batchnorm():
    case = tiny_case("batch")
    case.model.norm1.eval()  # the user froze one BN layer
    keep = probes.hessian_eigs(case.model, case.loss_fn, (case.x, case.y), mode="keep",
                               tol=1e-9, max_iter=200)
    train = probes.hessian_eigs(case.model, case.loss_fn, (case.x, case.y), mode="train",
                                tol=1e-9, max_iter=200)
    assert case.model.norm1.training is False and case.model.norm2.training is True
    assert keep.mode == "keep" and keep.records()[0]["mode"] == "keep"
    assert abs(keep.values[0] - train.values[0]) > 1e-6 * abs(train.values[0])


# -- several batches: one function at one state ------------------------------------------------

def renorm_with_running_statistics() -> nn.Module:
    """A BatchRenorm ResNet whose train-mode output reads its running statistics: limits fully
    relaxed (rmax 3, dmax 5) and running statistics away from the batch statistics."""
    from normlab.nn import resnet_cifar
    from normlab.nn.batch_renorm import BatchRenorm

    model = resnet_cifar(8, width=4, norm="batch_renorm", seed=0).double().train()
    gen = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, BatchRenorm):
            module.set_training_fraction(1.0)
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.uniform_(0.5, 2.0, generator=gen)
    return model


def test_probes_over_several_batches_measure_each_at_the_models_state():
    """A forward's running-statistics update (on the probe's private copies) must not reach the
    next batch: the Hessian of the mean over [b1, b2] is the mean of the two single-batch
    Hessians (ground truth: each probed alone), and the batch order does not matter."""
    model, loss_fn = renorm_with_running_statistics(), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(4)
    b1, b2 = [(torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64) * scale,
               torch.randint(0, 10, (8,), generator=gen)) for scale in (1.0, 3.0)]
    v = None
    products = {}
    for name, data in {"both": [b1, b2], "reversed": [b2, b1], "b1": [b1], "b2": [b2]}.items():
        with hessian_operator(model, loss_fn, data) as op:
            v = torch.randn(op.size, generator=gen, dtype=torch.float64) if v is None else v
            products[name] = op(v)
    alone = (products["b1"] + products["b2"]) / 2
    torch.testing.assert_close(products["both"], alone, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(products["reversed"], alone, rtol=1e-10, atol=1e-12)
    forward = probes.mean_gradient(model, loss_fn, [b1, b2]).gradient
    backward = probes.mean_gradient(model, loss_fn, [b2, b1]).gradient
    for name, g in forward.items():
        torch.testing.assert_close(g, backward[name], rtol=1e-10, atol=1e-12)


# -- read-offs: lr range test and the Jacobian ----------------------------------------------------

def test_suggested_lr_is_the_steepest_point_of_a_noisy_curve():
    lrs = list(np.geomspace(1e-4, 10, 100))
    gen = np.random.default_rng(0)
    truth = [2.0 - math.tanh(2 * math.log(lr / 1.4)) for lr in lrs]  # steepest at lr = 1.4
    losses = [t + 0.08 * gen.standard_normal() for t in truth]
    smoothed, average = [], 0.0
    for i, loss in enumerate(losses):
        average = 0.98 * average + 0.02 * loss
        smoothed.append(average / (1 - 0.98 ** (i + 1)))
    result = _read_curve(lrs, losses, smoothed, min(smoothed), 4.0, "train")
    assert 1.4 / 1.6 < result.suggested_lr < 1.4 * 1.6


def test_lanczos_top_k_are_converged_not_the_first_ritz_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    exact = probes.jacobian_singular_values(model, x, method="exact").values
    lanczos = probes.jacobian_singular_values(model, x, method="lanczos", k=3).values
    torch.testing.assert_close(lanczos, exact[:3], rtol=1e-8, atol=0)


# -- losses ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_several_outputs_per_example_reduce_like_the_batch_loss(reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, target = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction=reduction)
    g = probes.per_example_loss_grads(model, loss_fn, (x, target))
    c = probes.per_example_contributions(model, loss_fn, (x, target))
    full = torch.autograd.grad(loss_fn(model(x), target), list(model.parameters()))
    scale = 1 / 5 if reduction == "mean" else 1.0
    for (name, _), want in zip(model.named_parameters(), full, strict=True):
        torch.testing.assert_close(g[name].sum(0) * scale, want)
        torch.testing.assert_close(c[name].sum(0), want)
        torch.testing.assert_close(c[name], g[name] * scale)


def test_a_per_example_lambda_is_a_loss():
    model, data = dropout_mlp().eval(), batch()

    def per_example(out, y):
        return nn.functional.cross_entropy(out, y, reduction="none")

    lam = probes.per_example_loss_grads(model, per_example, data)
    ref = probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), data)
    for name in ref:
        torch.testing.assert_close(lam[name], ref[name])
    rows = probes.step_loss(model, per_example, data, steps=[0.0])
    assert rows[0]["value"] == pytest.approx(1.0)


# -- geometry of transposed convolutions ----------------------------------------------------------

def test_transposed_conv_units_are_weight_dim_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 2, stride=2, bias=False), nn.BatchNorm2d(3),
                          nn.Flatten(), nn.Linear(3 * 64, 2)).double().train()
    model[1].eps = 1e-14  # BN's eps breaks scale invariance by O(eps / var)
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    rows = probes.radial_tangential(model, nn.CrossEntropyLoss(), (x, y))
    shares = [r["value"] for r in rows if r["layer"] == "0" and r["quantity"] == "radial_share"]
    assert len(shares) == 3 and max(shares) < 1e-10  # BN after each output unit
    d = probes.random_direction(model)["0.weight"]
    w = model[0].weight.detach()
    torch.testing.assert_close(d.transpose(0, 1).reshape(3, -1).norm(dim=1),
                               w.transpose(0, 1).reshape(3, -1).norm(dim=1))


# -- coherence of a module called twice -----------------------------------------------------------

def test_coherence_counts_every_call_of_a_module():
    torch.manual_seed(0)
    layer, head = nn.Linear(3, 3).double(), nn.Linear(3, 2).double()
    model = nn.ModuleDict({"layer": layer, "head": head})
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner["head"](torch.tanh(self.inner["layer"](torch.tanh(
                self.inner["layer"](x)))))

    net = Twice()
    calls = []

    def record(module, inputs, output):
        call = [inputs[0].detach()]
        calls.append(call)
        output.register_hook(call.append)

    handle = layer.register_forward_hook(record)
    nn.CrossEntropyLoss()(net(x), y).backward()
    handle.remove()
    net.zero_grad(set_to_none=True)
    terms = torch.cat([d[:, :, None] * a[:, None, :] for a, d in calls])  # (calls x B, out, in)
    want = (terms.sum(0).abs() / terms.abs().sum(0)).mean()
    rows = probes.gradient_coherence(net, nn.CrossEntropyLoss(), (x, y), layers=["inner.layer"])
    got = [r["value"] for r in rows if r["quantity"] == "coherence_mean"]
    assert got == pytest.approx([float(want)], rel=1e-10)


# -- per-example gradients: which path, and why ---------------------------------------------------

class CallsItem(nn.Module):
    """A forward that vmap cannot run: it reads a number out with .item()."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        scale = 1.0 + 0.0 * x.abs().max().item()
        return self.fc(x) * scale


class ConvertsToChannelsLast(nn.Module):
    """A channels_last model that converts its input in forward: vmap cannot change a memory
    format (on a GPU, cuDNN's memory-format query fails the same way)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)  # (N, C, H, W)
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("make, shape", [(CallsItem, (4,)), (ConvertsToChannelsLast, (2, 3, 3))])
def test_auto_falls_back_to_the_vjp_when_vmap_cannot_run(make, shape):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(5, *shape, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError):
        probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), (x, y), method="vmap")
    auto = probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), (x, y))
    vjp = probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), (x, y), method="vjp")
    assert auto.method == "vjp" and auto.reason.startswith("vmap failed")
    for name in vjp:
        torch.testing.assert_close(auto[name], vjp[name])


def test_auto_uses_vmap_where_it_can_and_says_why_not_elsewhere():
    model, data = dropout_mlp(), batch()
    assert probes.per_example_loss_grads(model.eval(), nn.CrossEntropyLoss(), data).method == \
        "vmap"
    kept = probes.per_example_loss_grads(model.train(), nn.CrossEntropyLoss(), data)
    assert kept.method == "vjp" and "Dropout" in kept.reason
    hooked = dropout_mlp().eval()
    hooked[0].register_full_backward_hook(lambda m, gi, go: None)
    assert "hooks" in probes.per_example_loss_grads(hooked, nn.CrossEntropyLoss(), data).reason


def test_a_users_batch_coupled_layer_is_detected():
    class Center(nn.Module):
        def forward(self, x):
            return x - x.mean(dim=0, keepdim=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Center(), nn.Tanh(), nn.Linear(5, 3)).double()
    got = probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), batch())
    assert got.method == "vjp" and "batch coupling" in got.reason
    with pytest.raises(ConfigError, match="'method'"):
        probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), batch(), method="vmap")


def test_frozen_parameters_can_be_asked_for():
    model, data = dropout_mlp().eval(), batch()
    model[0].requires_grad_(False)
    got = probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), data, method="vjp",
                                        params=["0.weight"])
    x, y = data
    want = []
    for i in range(len(x)):
        w = model[0].weight.detach().clone().requires_grad_(True)
        out = torch.func.functional_call(model, {"0.weight": w}, (x,))
        loss = nn.functional.cross_entropy(out, y, reduction="none")[i]
        want.append(torch.autograd.grad(loss, w)[0])
    torch.testing.assert_close(got["0.weight"], torch.stack(want))
    assert model[0].weight.requires_grad is False


# -- degenerate input -----------------------------------------------------------------------------

def test_degenerate_input_gets_a_clear_answer():
    model, (x, y) = dropout_mlp().eval(), batch()
    empty = (x[:0], y[:0])
    for call in (lambda: probes.step_loss(model, nn.CrossEntropyLoss(), empty),
                 lambda: probes.hessian_eigs(model, nn.CrossEntropyLoss(), empty),
                 lambda: probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), empty)):
        with pytest.raises(ConfigError, match="at least one example"):
            call()
    frozen = dropout_mlp().requires_grad_(False)
    with pytest.raises(ConfigError, match="'params'"):
        probes.hessian_eigs(frozen, nn.CrossEntropyLoss(), (x, y))
    bad = x.clone()
    bad[0, 0] = math.inf
    eigs = probes.hessian_eigs(model, nn.CrossEntropyLoss(), (bad, y))
    assert not eigs.finite and not eigs.converged and math.isnan(eigs.values[0])
    assert eigs.records()[0]["finite"] is False


def test_one_nan_pixel_under_batchnorm_is_flagged():
    case = tiny_case("batch")
    x = case.x.clone()
    x[0, 0, 0, 0] = math.nan
    got = probes.per_example_loss_grads(case.model, case.loss_fn, (x, case.y))
    assert got.finite is False and all(r.get("finite") is False for r in got.records())
    clean = probes.per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y))
    assert clean.finite is True


# -- the calling convention -----------------------------------------------------------------------

def test_one_batch_probes_refuse_an_iterable():
    model, data = dropout_mlp().eval(), batch()
    with pytest.raises(ConfigError, match="one \\(x, y\\) batch"):
        probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), [data, data])
    with pytest.raises(ConfigError, match="one \\(x, y\\) batch"):
        probes.step_loss(model, nn.CrossEntropyLoss(), [data])


def _same(a, b):
    if isinstance(a, dict):
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    else:
        assert a == b


OLD_AND_NEW = {
    "per_example_loss_grads x, y": (
        lambda m, f, d: probes.per_example_loss_grads(m, f, d[0], d[1]),
        lambda m, f, d: probes.per_example_loss_grads(m, f, d)),
    "gradient_coherence x, y, layers": (
        lambda m, f, d: probes.gradient_coherence(m, f, d[0], d[1], [1]),
        lambda m, f, d: probes.gradient_coherence(m, f, d, layers=[1])),
    "hessian_eigs positional k and bn_mode": (
        lambda m, f, d: probes.hessian_eigs(m, f, d, 1, bn_mode="eval").values,
        lambda m, f, d: probes.hessian_eigs(m, f, d, k=1, mode="eval").values),
    "landscape positional directions": (
        lambda m, f, d: probes.landscape(m, f, d, [probes.random_direction(m)], 1.0, 3),
        lambda m, f, d: probes.landscape(m, f, d, directions=[probes.random_direction(m)],
                                         span=1.0, points=3)),
    "radial_tangential(model, grads)": (
        lambda m, f, d: probes.radial_tangential(
            m, {n: torch.ones_like(p) for n, p in m.named_parameters()}),
        lambda m, f, d: probes.radial_tangential(
            m, grads={n: torch.ones_like(p) for n, p in m.named_parameters()})),
    "radial_tangential(loss_fn=, x=, y=)": (
        lambda m, f, d: probes.radial_tangential(m, loss_fn=f, x=d[0], y=d[1]),
        lambda m, f, d: probes.radial_tangential(m, f, d)),
    "activation_stats positional layers": (
        lambda m, f, d: probes.activation_stats(m, d[0], [1]),
        lambda m, f, d: probes.activation_stats(m, d[0], layers=[1])),
}


@pytest.mark.parametrize("name", list(OLD_AND_NEW))
def test_old_call_forms_work_with_a_deprecation_warning(name):
    old, new = OLD_AND_NEW[name]
    model, data, loss_fn = dropout_mlp().eval(), batch(), nn.CrossEntropyLoss()
    with pytest.warns(DeprecationWarning):
        before = old(model, loss_fn, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        after = new(model, loss_fn, data)
    _same(before, after)


def test_lr_range_test_takes_the_users_optimizer_and_leaves_it_alone():
    model, data = dropout_mlp().eval(), batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.CrossEntropyLoss()(model(data[0]), data[1]).backward()
    optimizer.step()  # momentum buffers now exist
    state = {k: v["momentum_buffer"].clone() for k, v in optimizer.state.items()}
    result = probes.lr_range_test(model, nn.CrossEntropyLoss(), [data], start=1e-3, end=1e-1,
                                  steps=5, optimizer=optimizer)
    assert len(result.lrs) == 5 and len(result.to_frame()) == len(result.records())
    for k, v in optimizer.state.items():
        torch.testing.assert_close(v["momentum_buffer"], state[k], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="'optimizer'"):
        probes.lr_range_test(model, nn.CrossEntropyLoss(), [data], optimizer="sgd")
