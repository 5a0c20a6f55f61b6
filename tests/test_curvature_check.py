"""The Hessian probes' self-check (H v against central finite differences of the gradient) and
the second derivatives torch gets wrong (weight normalization), against brute force.

Ground truth here is independent of torch's second-order code where that code is on trial: the
dense Hessian of a weight-normed conv written out by hand (v * g / norm(v), whose double backward
is composed of plain operations), and closed forms of tiny losses.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import tiny_case
from normlab.nn import BatchRenorm
from normlab.probes import HessianCheckError, hessian_eigs, hvp
from normlab.probes.curvature import CHECK_TOLERANCE, hessian_operator, sharpness_callback
from test_curvature import dense_hessian
from zoo import ZOO

# -- a weight-normed conv, and its Hessian written out by hand ------------------------------------


def weight_normed_net(api: str) -> nn.Sequential:
    """conv(2->3, 3x3) under torch's weight_norm (either API) - tanh - linear(12->3), float64."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    if api == "parametrizations":
        conv = nn.utils.parametrizations.weight_norm(conv)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the older API is deprecated
            conv = nn.utils.weight_norm(conv)
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (5,), generator=gen))


def by_hand(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """The loss as a function of the model's flat parameters, with the weight v * g / norm(v)
    (norm over all but dim 0) composed of plain operations; and those parameters."""
    names = [n for n, _ in model.named_parameters()]
    g_name = next(n for n in names if n.endswith(("original0", "weight_g")))
    v_name = next(n for n in names if n.endswith(("original1", "weight_v")))
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        p, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            p[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        v, g = p[v_name], p[g_name]
        weight = v * g.reshape(-1, 1, 1, 1) / v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        hidden = torch.tanh(F.conv2d(x, weight, p["0.bias"])).flatten(1)
        return F.cross_entropy(F.linear(hidden, p["3.weight"], p["3.bias"]), y)

    return loss, torch.cat([params[n].detach().reshape(-1) for n in names]), names


@pytest.mark.parametrize("api", ["parametrizations", "weight_norm"])
def test_weight_normed_hvps_and_eigenvalues_equal_the_hessian_written_by_hand(api):
    """torch's own double backward through weight_norm is 5-41 % off; normlab's is exact."""
    model = weight_normed_net(api)
    x, y = batch()
    loss, theta, names = by_hand(model, x, y)
    H = torch.autograd.functional.hessian(loss, theta)
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
    pieces, start = {}, 0
    for name, p in model.named_parameters():
        pieces[name] = v[start:start + p.numel()].reshape(p.shape)
        start += p.numel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check passes quietly
        got = hvp(model, nn.CrossEntropyLoss(), (x, y), vector=pieces)
        eigs = hessian_eigs(model, nn.CrossEntropyLoss(), (x, y), tol=1e-10, max_iter=200)
    torch.testing.assert_close(torch.cat([got[n].reshape(-1) for n in names]), H @ v,
                               rtol=1e-8, atol=1e-10)
    assert eigs.values[0] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
    assert eigs.check_error is not None and eigs.check_error < CHECK_TOLERANCE
    assert eigs.records()[0]["check_error"] == eigs.check_error


# -- what the check refuses -----------------------------------------------------------------------


class OwnWeightNormConv(nn.Module):
    """A user's weight-normed conv calling torch's fused weight-norm kernel directly (torch's
    modules are recognised; this is not): its double backward is torch's, and wrong."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(3, 2, 3, 3)
        self.v = nn.Parameter(w)
        self.g = nn.Parameter(w.flatten(1).norm(dim=1).reshape(3, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, torch._weight_norm(self.v, self.g, 0))


class CubeWithFlatBackward(torch.autograd.Function):
    """x^3 whose backward detaches x: right first derivative, second derivative missing 6x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x.detach() ** 2


class Cube(nn.Module):
    def forward(self, x):
        return CubeWithFlatBackward.apply(x)


def test_batch_renorms_stopped_gradients_pass_the_check():
    """BatchRenorm's r and d carry no gradient by design, so moving the weights moves them in
    the finite differences and not in autograd's H v (a 117 % disagreement once they are
    active). The check holds them at 1 and 0 and passes; the probe's values are the Hessian
    with r and d held at their values (the dense autograd Hessian, which also holds them)."""
    case = tiny_case("batch_renorm")
    gen = torch.Generator().manual_seed(3)
    for module in case.model.modules():
        if isinstance(module, BatchRenorm):
            module.set_training_fraction(1.0)  # limits relaxed: r and d active
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.uniform_(0.5, 2.0, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eigs = hessian_eigs(case.model, case.loss_fn, (case.x, case.y), tol=1e-10,
                            max_iter=300)
    assert eigs.check_error < CHECK_TOLERANCE
    want = float(torch.linalg.eigvalsh(dense_hessian(case))[-1])
    assert eigs.values[0] == pytest.approx(want, rel=1e-6)


def own_weight_norm_net() -> nn.Sequential:
    return nn.Sequential(OwnWeightNormConv(), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))


def flat_backward_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4), Cube(),
                         nn.Linear(4, 3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("build, block", [(own_weight_norm_net, r"0\.[vg]"),
                                          (flat_backward_net, r"[024]\.(weight|bias)")])
def test_the_check_refuses_wrong_second_derivatives_and_names_the_parameter(build, block,
                                                                           dtype):
    torch.manual_seed(0)
    model = build().to(dtype)
    x, y = batch()
    data = (x.to(dtype), y)
    with pytest.raises(HessianCheckError, match=f"in the block of '{block}'"):
        hessian_eigs(model, nn.CrossEntropyLoss(), data)
    with pytest.raises(HessianCheckError):
        hvp(model, nn.CrossEntropyLoss(), data,
            vector={n: torch.ones_like(p) for n, p in model.named_parameters()})
    unchecked = hessian_eigs(model, nn.CrossEntropyLoss(), data, check=False, max_iter=5)
    assert unchecked.check_error is None and unchecked.hvps == 5  # measured, as asked


@pytest.mark.parametrize("zoo_name", ZOO.names())
def test_the_check_passes_quietly_on_the_zoo(zoo_name):
    case = ZOO.get(zoo_name)(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hessian_operator(case.model, case.loss_fn, case.data) as op:
            assert op.check_error is not None and op.check_error < CHECK_TOLERANCE
            assert op.count == 0  # the check's product is not one of the probe's


# -- where the check cannot tell, it says so ------------------------------------------------------


class GaussianNoise(nn.Module):
    """A user's noise layer: x + sigma * N(0, 1) in train mode."""

    def forward(self, x):
        return x + 0.5 * torch.randn_like(x) if self.training else x


def test_a_forward_that_draws_noise_is_checked_with_its_draws_fixed():
    """Each evaluation of the check starts from one RNG state, so a user's noise layer (new
    N(0, 1) draws at every forward under mode="keep") is checked like any other model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), GaussianNoise(), nn.Tanh(), nn.Linear(8, 3)).train()
    x = torch.randn(6, 5)
    y = torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eigs = hessian_eigs(model, nn.CrossEntropyLoss(), (x, y), mode="keep", max_iter=4)
    assert eigs.check_error < CHECK_TOLERANCE


class FixedDtype(nn.Module):
    """A forward that fixes its dtype (a float32 constant), so it does not run in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 4)

    def forward(self, x):
        return self.linear(x) @ torch.ones(4, 3)


def test_a_model_that_does_not_run_in_float64_is_not_checked_and_says_why():
    """Not a refusal: the probe still measures, and says the check could not run."""
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="not checked: the model does not run in float64"):
        eigs = hessian_eigs(FixedDtype(), nn.CrossEntropyLoss(),
                            (torch.randn(6, 5), torch.randint(0, 3, (6,))), max_iter=4)
    assert eigs.check_error is None


class Kinked(nn.Module):
    """L(b) = k relu(b - c) + b^2 / 2 per example: gradient k 1[b > c] + b jumps by k at c,
    Hessian 1 on either side."""

    def __init__(self, b: float, c: float = 1.0, k: float = 0.5) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor([b], dtype=torch.float64))
        self.c, self.k = c, k

    def forward(self, x):
        per = self.k * torch.relu(self.b - self.c) + self.b ** 2 / 2
        return per.expand(x.shape[0])  # one loss per example


def per_example(out, y):
    return out


def test_a_kink_within_the_first_step_is_passed_by_the_shorter_one():
    """b 1e-9 below the kink: the step of 1e-8 crosses it, the step of 1e-10 does not."""
    model = Kinked(1.0 - 1e-9)
    data = (torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hessian_operator(model, per_example, data) as op:
            assert op.check_error < 1e-3
            assert float(op(torch.ones(1, dtype=torch.float64))) == pytest.approx(1.0)


def test_a_kink_at_the_point_leaves_the_check_inconclusive_with_a_warning():
    """At b = c every step crosses the kink and the differences grow as 1/step: they disagree,
    and the check says it cannot tell instead of refusing a correct H v."""
    data = (torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3))
    with pytest.warns(RuntimeWarning, match="not checked: central differences at relative"), \
            hessian_operator(Kinked(1.0), per_example, data) as op:
        assert op.check_error is None


def test_the_sharpness_callback_checks_once_and_records_it():
    from types import SimpleNamespace

    from normlab.runs.tasks import RunContext

    model = weight_normed_net("parametrizations")
    x, y = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    context = RunContext()
    callback = sharpness_callback(max_iter=5)
    for step in range(2):
        callback(SimpleNamespace(model=model, loss_fn=nn.CrossEntropyLoss(), x=x, y=y, lr=0.1,
                                 step=step, context=context, optimizer=optimizer))
    rows = [r for r in context.records if r["quantity"] == "lambda_max"]
    assert rows[0]["check_error"] < CHECK_TOLERANCE
    assert "check_error" not in rows[1]
