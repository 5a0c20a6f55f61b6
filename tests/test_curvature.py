"""Hessian probes against a dense Hessian (torch.autograd.functional.hessian) of tiny models."""

import pytest
import torch
from torch.func import functional_call

from cases import NORM_KINDS, assert_unchanged, model_snapshot, tiny_case
from normlab.probes import hessian_eigs, hessian_trace, spectral_density
from normlab.probes.curvature import hessian_operator, hvp
from normlab.utils.config import ConfigError


def dense_hessian(case, names=None):
    """The full Hessian of the mean loss on the case's batch (train-mode BN on a buffer copy)."""
    model = case.model
    params = dict(model.named_parameters())
    names = names or list(params)
    shapes = [params[n].shape for n in names]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(flat):
        pieces, start = dict(params), 0
        for name, shape in zip(names, shapes, strict=True):
            pieces[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        state = {**pieces, **{n: b.clone() for n, b in buffers.items()}}
        return case.loss_fn(functional_call(model, state, (case.x,)), case.y)

    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("norm", ["none", "batch"])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalues_match_the_dense_hessian(norm, method):
    case = tiny_case(norm)
    before = model_snapshot(case.model)
    expected = torch.linalg.eigvalsh(dense_hessian(case)).flip(0)
    # power iteration finds the largest |eigenvalue|; after deflation that can be negative,
    # so it is checked for the top one only
    k = 2 if method == "lanczos" else 1
    eigs = hessian_eigs(case.model, case.loss_fn, (case.x, case.y), k=k, method=method,
                        tol=1e-10, max_iter=300 if method == "lanczos" else 3000)
    assert eigs.converged
    assert eigs.values == pytest.approx(expected[:k].tolist(), rel=1e-4)
    assert_unchanged(before, case.model)  # BN running statistics included


def test_eigenvectors_satisfy_the_eigen_equation():
    case = tiny_case("batch")
    H = dense_hessian(case)
    eigs = hessian_eigs(case.model, case.loss_fn, (case.x, case.y), k=1, tol=1e-12,
                        max_iter=300)
    v = torch.cat([t.reshape(-1) for t in eigs.vectors[0].values()])
    assert torch.linalg.norm(H @ v - eigs.values[0] * v) < 1e-4 * eigs.values[0]


def test_products_are_counted_and_lanczos_is_cheap_at_1e_3():
    case = tiny_case("batch")
    data = (case.x, case.y)
    lanczos = hessian_eigs(case.model, case.loss_fn, data, tol=1e-3)
    power = hessian_eigs(case.model, case.loss_fn, data, method="power", tol=1e-3)
    exact = float(torch.linalg.eigvalsh(dense_hessian(case))[-1])
    assert abs(lanczos.values[0] - exact) < 1e-2 * exact
    assert lanczos.hvps <= 30 and lanczos.hvps == len(lanczos.history)
    assert power.hvps == len(power.history)


def test_per_layer_restriction_is_the_hessian_block():
    case = tiny_case("batch")
    names = ["conv2.weight"]
    block = dense_hessian(case, names)
    eigs = hessian_eigs(case.model, case.loss_fn, (case.x, case.y), params=names, tol=1e-10,
                        max_iter=200)
    assert eigs.values[0] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-6)
    assert set(eigs.vectors[0]) == set(names)


def test_hvp_matches_dense_product():
    case = tiny_case("batch")
    H = dense_hessian(case)
    params = dict(case.model.named_parameters())
    v = {n: torch.randn_like(p) for n, p in params.items()}
    got = torch.cat([t.reshape(-1) for t in hvp(case.model, case.loss_fn, (case.x, case.y),
                                                 vector=v).values()])
    expected = H @ torch.cat([t.reshape(-1) for t in v.values()])
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10)


def test_eval_mode_uses_running_statistics():
    case = tiny_case("batch")
    train = hessian_eigs(case.model, case.loss_fn, (case.x, case.y), tol=1e-8, max_iter=200)
    evaluated = hessian_eigs(case.model, case.loss_fn, (case.x, case.y), tol=1e-8, max_iter=200,
                             mode="eval")
    assert evaluated.bn_mode == "eval" and train.bn_mode == "train"
    assert abs(train.values[0] - evaluated.values[0]) > 1e-3 * train.values[0]


def test_hutchinson_trace_within_statistical_tolerance():
    case = tiny_case("batch")
    exact = float(torch.trace(dense_hessian(case)))
    estimate = hessian_trace(case.model, case.loss_fn, (case.x, case.y), samples=200, seed=1)
    assert abs(estimate.value - exact) < 4 * estimate.stderr
    again = hessian_trace(case.model, case.loss_fn, (case.x, case.y), samples=200, seed=1)
    assert again.value == estimate.value  # seeded


def test_lanczos_quadrature_is_exact_for_low_degree_polynomials():
    # ground truth: with a unit start vector v, sum_j w_j theta_j^p = v^T H^p v for p < 2m
    case = tiny_case("none")
    H = dense_hessian(case)
    density = spectral_density(case.model, case.loss_fn, (case.x, case.y), steps=6, seed=3)
    nodes, weights = density.nodes[0], density.weights[0]
    generator = torch.Generator().manual_seed(3)
    v = torch.randn(H.shape[0], generator=generator, dtype=torch.float64)
    v = v / v.norm()
    for p in range(0, 8):
        expected = float(v @ torch.linalg.matrix_power(H, p) @ v)
        assert float((weights * nodes ** p).sum()) == pytest.approx(expected, rel=1e-6)
    grid = torch.linspace(-5, 15, 2001)
    area = float(density.smoothed(grid, 0.3).sum() * (grid[1] - grid[0]))
    assert area == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("norm", NORM_KINDS)
def test_curvature_probes_leave_the_model_unchanged(norm):
    case = tiny_case(norm)
    before = model_snapshot(case.model)
    data = (case.x, case.y)
    hessian_eigs(case.model, case.loss_fn, data, max_iter=5)
    hessian_trace(case.model, case.loss_fn, data, samples=2)
    spectral_density(case.model, case.loss_fn, data, steps=3)
    with hessian_operator(case.model, case.loss_fn, data) as op:
        op(torch.ones(op.size, dtype=torch.float64))
    assert_unchanged(before, case.model)


def test_bad_settings_are_named():
    case = tiny_case("none")
    data = (case.x, case.y)
    with pytest.raises(ConfigError, match="method"):
        hessian_eigs(case.model, case.loss_fn, data, method="arnoldi")
    with pytest.raises(ConfigError, match="mode"):
        hessian_eigs(case.model, case.loss_fn, data, mode="test")
    with pytest.raises(ConfigError, match="params"):
        hessian_eigs(case.model, case.loss_fn, data, params=["nope"])
    with pytest.raises(ConfigError, match="'k'"):
        hessian_eigs(case.model, case.loss_fn, data, k=0)


def test_sharpness_callback_records_thresholds():
    from types import SimpleNamespace

    from normlab.runs.tasks import RunContext
    from normlab.train.callbacks import scheduled

    case = tiny_case("batch")
    optimizer = torch.optim.SGD(case.model.parameters(), lr=0.05, momentum=0.9)
    context = RunContext()
    callback = scheduled("sharpness", every=1, batch="first")
    callback(SimpleNamespace(model=case.model, loss_fn=case.loss_fn, x=case.x, y=case.y,
                             lr=0.05, step=0, context=context, optimizer=optimizer))
    values = {r["quantity"]: r["value"] for r in context.records}
    assert values["two_over_lr"] == pytest.approx(40.0)
    assert values["two_one_plus_momentum_over_lr"] == pytest.approx(76.0)
    exact = float(torch.linalg.eigvalsh(dense_hessian(case))[-1])
    assert values["lambda_max"] == pytest.approx(exact, rel=1e-2)


def two_batches(case):
    """The case's batch and a second one of the same shape."""
    gen = torch.Generator().manual_seed(5)
    x2 = torch.randn(case.x.shape, generator=gen, dtype=case.x.dtype).to(case.x.device)
    return [(case.x, case.y), (x2, case.y.flip(0))]


@pytest.mark.parametrize("norm", NORM_KINDS)
@pytest.mark.parametrize("path", ["reused_graph", "step_function"])
def test_every_hvp_path_is_the_dense_hessian_times_v(norm, path):
    """Ground truth: the dense Hessian of each batch's mean loss; over two batches, their mean."""
    case = tiny_case(norm)
    before = model_snapshot(case.model)
    batches = two_batches(case)
    dense = []
    for x, y in batches:
        case.x, case.y = x, y
        dense.append(dense_hessian(case))
    gen = torch.Generator().manual_seed(6)
    with hessian_operator(case.model, case.loss_fn, batches, path=path) as op:
        assert op.path == path and op.refused is None
        for _ in range(4):  # several products from the one operator (its vector buffer reused)
            v = torch.randn(op.size, generator=gen, dtype=torch.float64)
            torch.testing.assert_close(op(v), (dense[0] @ v + dense[1] @ v) / 2,
                                       rtol=1e-9, atol=1e-11)
    assert op.count == 4
    assert_unchanged(before, case.model)


@pytest.mark.device
@pytest.mark.parametrize("norm", ["none", "batch", "batch_renorm"])
def test_the_default_hvp_path_equals_the_reused_graph_on_the_device(norm, device):
    """On CUDA the default path records a product in a CUDA graph after two eager ones and then
    replays it: every product, before and after the capture, equals the reused graph's."""
    case = tiny_case(norm)
    case.model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in two_batches(case)]
    gen = torch.Generator().manual_seed(7)
    vectors = [torch.randn(sum(p.numel() for p in case.model.parameters()), generator=gen,
                           dtype=torch.float64).to(device) for _ in range(5)]
    with hessian_operator(case.model, case.loss_fn, batches, path="reused_graph") as op:
        expected = [op(v) for v in vectors]
    with hessian_operator(case.model, case.loss_fn, batches) as op:
        assert op.path == ("cuda_graph" if device.type == "cuda" else "reused_graph")
        for v, want in zip(vectors, expected, strict=True):
            torch.testing.assert_close(op(v), want, rtol=1e-8, atol=1e-10)
        assert op.refused is None


def test_a_cuda_graph_path_needs_a_cuda_model():
    case = tiny_case("none")
    data = (case.x, case.y)
    with pytest.raises(ConfigError, match="'path' setting 'cuda_graph' needs the model on a"), \
            hessian_operator(case.model, case.loss_fn, data, path="cuda_graph"):
        pass
    with pytest.raises(ConfigError, match="'path'"), \
            hessian_operator(case.model, case.loss_fn, data, path="fast"):
        pass


# -- one Dropout mask per operator, one step function per batch shape -----------------------------


def dropout_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 3)).double().train()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 5, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (6,), generator=gen)) for _ in range(2)]
    return model, torch.nn.CrossEntropyLoss(), batches


def fixed_mask_dense_hessian(model, loss_fn, batches):
    """The dense Hessian of the mean loss over `batches` with Dropout on, each batch's mask the
    one its forward draws from the global RNG as it is now (batch after batch); the RNG is left
    as it was."""
    params = dict(model.named_parameters())
    shapes = {n: p.shape for n, p in params.items()}
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    start_state = torch.get_rng_state()
    total = 0
    for x, y in batches:
        state = torch.get_rng_state()

        def loss(theta, x=x, y=y, state=state):
            pieces, start = {}, 0
            for n, shape in shapes.items():
                pieces[n] = theta[start:start + shape.numel()].reshape(shape)
                start += shape.numel()
            torch.set_rng_state(state)
            return loss_fn(functional_call(model, pieces, (x,)), y) / len(batches)

        total = total + torch.autograd.functional.hessian(loss, flat)
        torch.set_rng_state(state)
        with torch.no_grad():
            model(x)  # the draws of this batch's forward: the next batch's mask starts after
    torch.set_rng_state(start_state)
    return total


@pytest.mark.parametrize("path", ["reused_graph", "step_function"])
def test_dropout_draws_one_mask_per_operator_on_every_path(path):
    """mode="keep" with Dropout on: the same v gives the same H v every time, and it is the
    product with the dense Hessian of the loss with the masks fixed at the operator's start
    (on main the step function drew new masks per product: H v 68 % apart)."""
    model, loss_fn, batches = dropout_mlp()
    dense = fixed_mask_dense_hessian(model, loss_fn, batches)
    assert not torch.allclose(dense, fixed_mask_dense_hessian_without_dropout(model, loss_fn,
                                                                              batches))
    gen = torch.Generator().manual_seed(4)
    with hessian_operator(model, loss_fn, batches, mode="keep", path=path) as op:
        assert op.check_error is not None  # the check ran with its masks fixed, and passed
        u, v = (torch.randn(op.size, generator=gen, dtype=torch.float64) for _ in range(2))
        first, again, hu = op(v), op(v), op(u)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(first, dense @ v, rtol=1e-9, atol=1e-11)
    assert float(u @ first) == pytest.approx(float(v @ hu), rel=1e-9)  # symmetric
    eigs = hessian_eigs(model, loss_fn, batches, mode="keep", tol=1e-10, max_iter=200)
    assert eigs.values[0] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-8)


def fixed_mask_dense_hessian_without_dropout(model, loss_fn, batches):
    """The same Hessian with Dropout off (to show the masks matter in the test above)."""
    saved = [(m, m.training) for m in model.modules()]
    model[2].eval()
    try:
        return fixed_mask_dense_hessian(model, loss_fn, batches)
    finally:
        for m, training in saved:
            m.training = training


def test_a_multi_batch_step_function_copies_each_batch_into_one_static_input():
    """N batches of one shape share one step function (on CUDA: one graph and one memory pool,
    not one per batch); a batch of another shape gets a second one in the same pool. Products
    stay those of the reused graph (checked against the dense Hessian above)."""
    case = tiny_case("batch")
    gen = torch.Generator().manual_seed(8)
    batches = [(torch.randn(case.x.shape, generator=gen, dtype=case.x.dtype),
                torch.randint(0, 3, (case.x.shape[0],), generator=gen)) for _ in range(4)]
    ragged = [*batches, (batches[0][0][:4], batches[0][1][:4])]
    for data, shapes in ((batches, 1), (ragged, 2)):
        v = torch.randn(sum(p.numel() for p in case.model.parameters()), generator=gen,
                        dtype=torch.float64)
        with hessian_operator(case.model, case.loss_fn, data, path="reused_graph",
                              check=False) as op:
            want = op(v)
        with hessian_operator(case.model, case.loss_fn, data, path="step_function",
                              check=False) as op:
            assert op.captures == shapes
            steps = list(op._steps.values())
            assert len({id(s.call.pool) for s in steps}) == 1  # one memory pool for all
            assert all(case.model in s.call.modules for s in steps)  # hooks checked on capture
            torch.testing.assert_close(op(v), want, rtol=1e-9, atol=1e-11)


@pytest.mark.device
def test_dropout_masks_are_fixed_on_the_devices_default_path(device):
    """On CUDA the default path replays a CUDA graph whose Dropout draws from the generator's
    state at replay: restoring that state per batch keeps one mask, equal to the reused graph's
    (on a CPU both sides are the reused graph)."""
    model, loss_fn, batches = dropout_mlp()
    model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    gen = torch.Generator().manual_seed(9)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=gen,
                    dtype=torch.float64).to(device)
    with hessian_operator(model, loss_fn, batches, mode="keep", path="reused_graph") as op:
        want = op(v)
    with hessian_operator(model, loss_fn, batches, mode="keep") as op:
        got = [op(v) for _ in range(2 + 3)]  # eager warm-up, the capture, replays
    for product in got:
        torch.testing.assert_close(product, want, rtol=1e-8, atol=1e-10)
