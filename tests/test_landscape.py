"""landscape and its direction builders: slices against direct evaluation, zero parameters,
orthogonality, radial/tangential split, modes, hygiene; mean_gradient against brute force."""

import math

import pytest
import torch

from cases import NORM_KINDS, assert_unchanged, model_snapshot, tiny_case
from normlab.probes import landscape, mean_gradient
from normlab.probes._batches import dot
from normlab.probes.landscape import (
    hessian_direction,
    radial_direction,
    random_direction,
    scaled_direction,
    tangential_direction,
)
from normlab.utils.config import ConfigError


def _batches(case, n=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(case.x.shape, generator=generator, dtype=case.x.dtype),
             torch.randint(0, 3, case.y.shape, generator=generator)) for _ in range(n)]


def test_one_dimensional_slice_matches_direct_evaluation():
    case = tiny_case("batch")
    d = random_direction(case.model, seed=2)
    records = landscape(case.model, case.loss_fn, (case.x, case.y),
                        directions=[d], span=0.5, points=5)
    alphas = [r["alpha"] for r in records]
    assert alphas == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5])
    model = case.model
    for record in records:
        moved = tiny_case("batch").model
        moved.load_state_dict(model.state_dict())
        with torch.no_grad():
            for name, p in moved.named_parameters():
                if name in d:
                    p.add_(record["alpha"] * d[name])
            expected = float(case.loss_fn(moved(case.x), case.y))
        assert record["value"] == pytest.approx(expected, rel=1e-12)
        assert record["bn_mode"] == "train"


def test_two_dimensional_slice_has_a_grid_and_the_origin():
    case = tiny_case("none")
    d1 = random_direction(case.model, seed=1)
    d2 = random_direction(case.model, seed=2, orthogonal_to=d1)
    records = landscape(case.model, case.loss_fn, (case.x, case.y),
                        directions=[d1, d2], span=(-1, 1),
                        points=3, labels=["a", "b"])
    assert len(records) == 9
    origin = [r["value"] for r in records if r["alpha"] == 0 and r["beta"] == 0]
    with torch.no_grad():
        assert origin == pytest.approx([float(case.loss_fn(case.model(case.x), case.y))])
    assert {(r["direction"], r["direction2"]) for r in records} == {("a", "b")}


def test_random_directions_are_filter_normalized_and_orthogonal():
    case = tiny_case("batch")
    d1 = random_direction(case.model, seed=1)
    w = case.model.conv2.weight.detach()
    ratio = d1["conv2.weight"].reshape(4, -1).norm(dim=1) / w.reshape(4, -1).norm(dim=1)
    assert torch.allclose(ratio, torch.ones(4, dtype=ratio.dtype))
    assert "norm1.bias" not in d1  # 1-D parameters are not moved by default
    d2 = random_direction(case.model, seed=2, orthogonal_to=d1)
    assert abs(dot(d1, d2)) < 1e-10 * dot(d1, d1)


def test_zero_valued_parameters_give_no_nan():
    case = tiny_case("batch")  # fresh BN biases are exactly 0
    assert torch.count_nonzero(case.model.norm1.bias) == 0
    d = random_direction(case.model, seed=0, include_1d=True)
    assert torch.equal(d["norm1.bias"], torch.zeros(4, dtype=d["norm1.bias"].dtype))
    assert all(torch.isfinite(t).all() for t in d.values())
    with torch.no_grad():
        case.model.conv1.weight[0].zero_()  # a dead filter too
    d = random_direction(case.model, seed=0, include_1d=True)
    assert all(torch.isfinite(t).all() for t in d.values())
    records = landscape(case.model, case.loss_fn, (case.x, case.y),
                        directions=[d], span=1, points=3)
    assert all(math.isfinite(r["value"]) for r in records)


def test_radial_and_tangential_directions_split_the_gradient():
    case = tiny_case("none")
    grads = {n: torch.randn_like(p) for n, p in case.model.named_parameters()}
    radial = radial_direction(case.model, grads)
    tangential = tangential_direction(case.model, grads)
    assert set(radial) == {"conv1.weight", "conv2.weight", "fc.weight"}
    for name in radial:
        assert torch.allclose(radial[name] + tangential[name], grads[name])
        w = dict(case.model.named_parameters())[name].detach()
        per_filter = (tangential[name] * w).reshape(w.shape[0], -1).sum(1)
        assert per_filter.abs().max() < 1e-10


def test_scaled_and_hessian_directions():
    case = tiny_case("batch")
    grads = {n: torch.randn_like(p) for n, p in case.model.named_parameters()}
    unit = scaled_direction(case.model, grads, scale="unit")
    assert dot(unit, unit) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="scale"):
        scaled_direction(case.model, grads, scale="filter")
    top = hessian_direction(case.model, case.loss_fn, (case.x, case.y))
    assert dot(top, top) == pytest.approx(1.0)


def test_eval_mode_is_recorded_and_differs():
    case = tiny_case("batch")
    d = random_direction(case.model, seed=3)
    train = landscape(case.model, case.loss_fn, (case.x, case.y),
                        directions=[d], span=0.1, points=2)
    evaluated = landscape(case.model, case.loss_fn, (case.x, case.y),
                        directions=[d], span=0.1, points=2,
                          mode="eval")
    assert {r["bn_mode"] for r in evaluated} == {"eval"}
    assert train[0]["value"] != pytest.approx(evaluated[0]["value"])


@pytest.mark.parametrize("norm", NORM_KINDS)
def test_landscape_and_mean_gradient_leave_the_model_unchanged(norm):
    case = tiny_case(norm)
    before = model_snapshot(case.model)
    d = random_direction(case.model, seed=1, include_1d=True)
    landscape(case.model, case.loss_fn, _batches(case, 2), directions=[d, d], span=1, points=2)
    mean_gradient(case.model, case.loss_fn, _batches(case, 2))
    assert_unchanged(before, case.model)


def test_mean_gradient_is_the_average_of_batch_gradients():
    case = tiny_case("none")
    batches = _batches(case, 4)
    result = mean_gradient(case.model, case.loss_fn, batches)
    params = list(case.model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for x, y in batches:  # brute force: one autograd.grad per batch
        for e, g in zip(expected, torch.autograd.grad(case.loss_fn(case.model(x), y), params),
                        strict=True):
            e += g / len(batches)
    for (name, _), e in zip(case.model.named_parameters(), expected, strict=True):
        assert torch.allclose(result.gradient[name], e, rtol=1e-10, atol=1e-14)
    assert -1.0 <= result.stability <= 1.0 and result.batches == 4
    assert 0 < result.radial_share < 1


def test_mean_gradient_of_repeated_batches_is_perfectly_stable():
    case = tiny_case("batch")
    batch = (case.x, case.y)
    result = mean_gradient(case.model, case.loss_fn, [batch, batch])
    assert result.stability == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="batches"):
        mean_gradient(case.model, case.loss_fn, [batch])


def test_mean_gradient_cosine_with_the_top_singular_direction():
    case = tiny_case("none")
    result = mean_gradient(case.model, case.loss_fn, _batches(case, 2),
                           spectrum_batch=(case.x, case.y))
    rows = [r for r in result.records if r["quantity"] == "top_singular_cosine"]
    assert {r["layer"] for r in rows} == {"conv1", "conv2", "fc"}
    assert all(0 <= r["value"] <= 1 + 1e-12 for r in rows)
