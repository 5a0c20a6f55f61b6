"""Per-example gradients against brute force: one backward of each ell_i through the batch."""

from __future__ import annotations

import warnings

import pytest
import torch

from cases import NORM_KINDS, tiny_case
from normlab.probes import per_example_contributions, per_example_loss_grads
from normlab.probes._hygiene import frozen_norm_statistics
from normlab.probes.per_example import _rows_disagree
from normlab.utils.config import ConfigError

UNCOUPLED = ("none", "group", "layer", "instance")


def brute_force_grads(case) -> dict[str, torch.Tensor]:
    """g_i = d ell_i / d theta: forward the whole batch, backward ell_i alone, for each i."""
    model = case.model
    params = dict(model.named_parameters())
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    with frozen_norm_statistics(model):
        for i in range(case.x.shape[0]):
            losses = torch.nn.functional.cross_entropy(model(case.x), case.y, reduction="none")
            grads = torch.autograd.grad(losses[i], list(params.values()), allow_unused=True)
            for k, g, p in zip(params, grads, params.values(), strict=True):
                rows[k].append(torch.zeros_like(p) if g is None else g)
    return {k: torch.stack(v) for k, v in rows.items()}


def batch_gradient(case) -> dict[str, torch.Tensor]:
    with frozen_norm_statistics(case.model):
        loss = case.loss_fn(case.model(case.x), case.y)
        params = dict(case.model.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()))
        return dict(zip(params, grads, strict=True))


def assert_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for k in want:
        scale = want[k].abs().max().clamp_min(1e-12)
        assert (got[k] - want[k]).abs().max() <= rtol * scale, k


@pytest.mark.parametrize("norm", NORM_KINDS)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_loss_grads_match_brute_force_in_train_mode(norm, chunk_size):
    case = tiny_case(norm)
    want = brute_force_grads(case)
    got = per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y), chunk_size=chunk_size)
    assert got.quantity == "per_example_loss_grads" and got.bn_mode == "train"
    assert got["conv1.weight"].shape == (6, *case.model.conv1.weight.shape)
    assert_close(got, want)


@pytest.mark.parametrize("norm", UNCOUPLED)
def test_vjp_and_vmap_paths_agree_without_coupling(norm):
    case = tiny_case(norm)
    fast = per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y), method="vmap")
    slow = per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y), method="vjp",
                                  chunk_size=3)
    assert fast.method == "vmap" and slow.method == "vjp"
    assert_close(fast, slow)


def test_auto_picks_vjp_for_batchnorm_in_train_and_vmap_in_eval():
    case = tiny_case("batch")
    assert per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y)).method == "vjp"
    case.model.eval()
    got = per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y))
    assert got.method == "vmap" and got.bn_mode == "eval"
    assert_close(got, brute_force_grads(case))


def test_vmap_refused_for_batch_coupled_model():
    case = tiny_case("batch")
    with pytest.raises(ConfigError, match="'method'"):
        per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y), method="vmap")


def test_loss_grads_sum_to_the_summed_loss_gradient_under_bn():
    case = tiny_case("batch_renorm")
    got = per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y), params=["fc.weight"])
    assert list(got) == ["fc.weight"]
    batch = batch_gradient(case)["fc.weight"]
    torch.testing.assert_close(got["fc.weight"].sum(0) / case.x.shape[0], batch)


@pytest.mark.device
@pytest.mark.parametrize("norm", ["batch", "batch_renorm"])
def test_the_default_rows_equal_the_naive_loop_on_the_device(norm, device):
    """On CUDA the default path replays a recorded one-row backward per example: it must equal
    B plain backward passes, with no fallback (a RuntimeWarning) along the way."""
    case = tiny_case(norm)
    case.model.to(device)
    case.x, case.y = case.x.to(device), case.y.to(device)
    want = brute_force_grads(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):  # a second call captures afresh
            got = per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y))
            assert got.method == "vjp"
            assert_close(got, want)


def _eager_rows(case, picks):
    """The per-parameter rows of the brute force, and eager gradients of rows `picks` and of
    the summed losses, as `_captured_rows` takes them from eager backwards."""
    want = brute_force_grads(case)
    rows = [want[n] for n in want]
    eager = {i: [r[i] for r in rows] for i in picks}
    whole = [r.sum(0) for r in rows]
    return rows, eager, whole


def test_captured_rows_are_checked_row_by_row_not_only_through_their_sum():
    """The check `_captured_rows` runs on CUDA, with given rows: rows 0, B/2 and B-1 against
    eager backwards, and the sum of every row against the summed losses' gradient."""
    case = tiny_case("batch")
    picks = (0, 3, 5)
    rows, eager, whole = _eager_rows(case, picks)
    assert _rows_disagree(rows, eager, whole) is None
    noisy = [r * (1 + 1e-10 * torch.randn_like(r)) for r in rows]  # rounding passes
    assert _rows_disagree(noisy, eager, whole) is None
    off = [r.clone() for r in rows]
    off[0][3] *= 1.001  # one checked row 0.1 % off (a sum check at 1 % misses it)
    assert "row 3" in _rows_disagree(off, eager, whole)
    swapped = [r.clone() for r in rows]
    for r in swapped:
        r[[0, 1]] = r[[1, 0]]  # same sum, a checked row wrong
    assert "row 0" in _rows_disagree(swapped, eager, whole)
    unchecked = [r.clone() for r in rows]
    unchecked[1][2] += 1e-3 * unchecked[1].abs().max()  # a row no eager backward looks at
    assert "add up" in _rows_disagree(unchecked, eager, whole)
    whole[0] = whole[0] * float("nan")
    assert _rows_disagree(off, eager, whole) is None  # nothing to check: finite=False says it


def test_max_memory_bounds_the_chunk():
    case = tiny_case("batch")
    got = per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y), max_memory=1)
    assert_close(got, brute_force_grads(case))


@pytest.mark.parametrize("setting,value", [("chunk_size", 0), ("max_memory", -1.0),
                                           ("method", "magic")])
def test_bad_settings_are_refused(setting, value):
    case = tiny_case("none")
    with pytest.raises(ConfigError, match=setting):
        per_example_loss_grads(case.model, case.loss_fn, (case.x, case.y), **{setting: value})


@pytest.mark.parametrize("norm", NORM_KINDS)
def test_contributions_sum_to_the_batch_gradient(norm):
    case = tiny_case(norm)
    got = per_example_contributions(case.model, case.loss_fn, (case.x, case.y))
    assert got.quantity == "per_example_contributions"
    want = batch_gradient(case)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].sum(0), want[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", UNCOUPLED)
def test_contributions_equal_loss_grads_over_b_without_coupling(norm):
    case = tiny_case(norm)
    got = per_example_contributions(case.model, case.loss_fn, (case.x, case.y))
    exact = brute_force_grads(case)
    assert_close({k: v * case.x.shape[0] for k, v in got.items()}, exact)


def test_contributions_differ_from_loss_grads_under_batchnorm():
    case = tiny_case("batch")
    got = per_example_contributions(case.model, case.loss_fn, (case.x, case.y))
    exact = brute_force_grads(case)
    gap = (got["conv1.weight"] * case.x.shape[0] - exact["conv1.weight"]).abs().max()
    assert gap > 1e-3 * exact["conv1.weight"].abs().max()


def test_contributions_of_a_strided_grouped_padded_conv():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect",
                           dtype=torch.float64)
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.LazyLinear(3,
                                dtype=torch.float64))
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    model(x)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    got = per_example_contributions(model, loss_fn, (x, y))
    want = per_example_loss_grads(model, loss_fn, (x, y), method="vjp")
    assert_close(dict(got), dict(want))  # sum reduction: c_i = g_i


def test_contributions_of_torch_layernorm_over_trailing_dims():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4),
                                torch.nn.Flatten(), torch.nn.Linear(16, 3)).double()
    x = torch.randn(5, 4, 4, dtype=torch.float64)  # (B, positions = 4, features = 4)
    y = torch.randint(0, 3, (5,))
    loss_fn = torch.nn.CrossEntropyLoss()
    got = per_example_contributions(model, loss_fn, (x, y))
    want = per_example_loss_grads(model, loss_fn, (x, y), method="vjp")
    assert_close({k: v * 5 for k, v in got.items()}, dict(want))


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_a_users_full_backward_hook_on_the_first_layer_warns_nothing(chunk_size):
    """torch warns on each backward through a full backward hook whose module input needs no
    gradient; the B per-example backwards repeated it B times. The hook still runs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).double()

    def hook(module, grad_in, grad_out):
        warnings.warn("the hook's own warning passes", UserWarning, stacklevel=1)

    model[0].register_full_backward_hook(hook)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = per_example_loss_grads(model, torch.nn.CrossEntropyLoss(), (x, y), method="vjp",
                                     chunk_size=chunk_size)
    assert caught and {str(w.message) for w in caught} == {"the hook's own warning passes"}
    assert got.method == "vjp"
