"""The probes on layers a user writes (issue 17, items 1-6 and 12), against brute force:
float64 loops of autograd.grad, per-example layer copies (`brute_force`), dense Hessians."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from brute_force import contributions_by_copies, dense_hessian_eigvals
from cases import assert_unchanged, model_snapshot
from normlab import probes
from normlab.nn import ExampleAxis, example_axes, is_batch_coupled, norm_layers, resnet_cifar
from normlab.nn.batch_renorm import set_training_fraction
from normlab.probes._modes import probe_mode
from normlab.utils.config import ConfigError
from zoo import ReZeroNet, UserBatchNorm


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-9, name: str = "") -> None:
    scale = want.abs().max().clamp_min(1e-12)
    assert (got - want).abs().max() <= rtol * scale, f"{name}: {got} vs {want}"


def _loop_grads(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """g_i = d ell_i / d theta: the batch forward (no running statistics moved), then one
    backward per example."""
    ref = copy.deepcopy(model)
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    losses = F.cross_entropy(ref(x), y, reduction="none")
    rows = [torch.autograd.grad(losses[i], list(params.values()), retain_graph=True,
                                allow_unused=True) for i in range(len(x))]
    return {n: torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows])
            for j, (n, p) in enumerate(params.items())}


def _batch_gradient(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    got = torch.autograd.grad(F.cross_entropy(ref(x), y), list(params.values()))
    return dict(zip(params, got, strict=True))


def _images(batch: int = 6, channels: int = 2, size: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, size, size, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (batch,), generator=gen))


# -- item 1: BatchRenorm contributions once r and d are active -------------------------------------

def test_batchrenorm_contributions_with_active_r_and_d_equal_the_layer_copies():
    torch.manual_seed(0)
    model = resnet_cifar(8, norm="batch_renorm", width=4).double().train()
    set_training_fraction(model, 1.0)  # rmax = 3, dmax = 5: r and d act
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.normal_()
                module.running_var.uniform_(0.3, 3.0)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    got = probes.per_example_contributions(model, nn.CrossEntropyLoss(), (x, y))
    want = contributions_by_copies(model, nn.CrossEntropyLoss(), x, y)
    frozen = copy.deepcopy(model)
    for module in frozen.modules():
        if hasattr(module, "momentum"):
            module.momentum = 0.0  # the batch gradient at the running statistics as they are
    batch = _batch_gradient(frozen, x, y)
    norm_weights = [n for n in got if "norm" in n and n.endswith("weight")]
    assert len(norm_weights) == 7
    for name, rows in got.items():
        _close(rows, want[name], name=name)
        _close(rows.sum(0), batch[name], name=name)


# -- item 2: a user's own normalization layer under mode="train" -----------------------------------

class UserNormNet(nn.Module):
    """conv - the user's BatchNorm - tanh - Dropout - pool - linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = UserBatchNorm(3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.tanh(self.norm(self.conv(x)))).mean(dim=(2, 3)))


def test_mode_train_counts_a_users_norm_as_a_norm_and_nothing_else():
    torch.manual_seed(0)
    model = UserNormNet().double().eval()
    x, _ = _images()
    assert norm_layers(model, x).names == ("norm",)
    with probe_mode(model, "train", x):
        assert model.norm.training and not model.drop.training and not model.training
    assert not model.norm.training


def test_hessian_in_train_mode_uses_a_users_norm_on_batch_statistics():
    torch.manual_seed(0)
    model = UserNormNet().double().eval()
    x, y = _images()
    got = probes.hessian_eigs(model, nn.CrossEntropyLoss(), (x, y), tol=1e-10, max_iter=100)
    ref = copy.deepcopy(model)
    ref.norm.train()  # the user's norm on batch statistics, Dropout off
    want = dense_hessian_eigvals(ref, nn.CrossEntropyLoss(), x, y).max()
    assert got.values[0] == pytest.approx(float(want), rel=1e-6)
    assert got.bn_mode == "train"


def test_a_norm_whose_flag_also_switches_dropout_is_refused_by_name_in_train_mode():
    class NormAndDropout(UserBatchNorm):
        def forward(self, x):
            return F.dropout(super().forward(x), 0.5, self.training)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), NormAndDropout(3), nn.Flatten(),
                          nn.Linear(27, 3)).double()
    x, y = _images()
    with pytest.raises(ConfigError, match="module '1' switches batch statistics and randomness"):
        probes.step_loss(model, nn.CrossEntropyLoss(), (x, y), steps=[0.1])
    probes.step_loss(model, nn.CrossEntropyLoss(), (x, y), steps=[0.1], mode="keep")


def test_a_module_that_cannot_run_alone_is_refused_by_name_in_train_mode():
    class Stateful(nn.Module):
        """Works only when called in its model's order (it consumes a token set before)."""

        def __init__(self) -> None:
            super().__init__()
            self.ready = []

        def forward(self, x):
            self.ready.pop()
            return x

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.odd = Stateful()

        def forward(self, x):
            self.odd.ready.append(True)
            return self.fc(self.odd(x))

    model = Model().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match="module 'odd' is a normalization layer: it could not"):
        probes.step_loss(model, nn.CrossEntropyLoss(), (x, torch.zeros(5, dtype=torch.long)),
                         steps=[0.1])


# -- item 3: batch coupling behind a gate or a zero-initialised head ------------------------------

class ZeroHead(nn.Module):
    """conv - the user's BatchNorm - pool - a zero-initialised head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = UserBatchNorm(3)
        self.head = nn.Linear(3, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("make", [ReZeroNet, ZeroHead])
def test_auto_sees_batch_coupling_hidden_by_a_zero_gate_or_head(make):
    torch.manual_seed(0)
    model = make().double().train()
    x, y = _images()
    assert is_batch_coupled(model, x)
    got = probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), (x, y))
    assert got.method == "vjp" and "batch coupling" in got.reason
    want = _loop_grads(model, x, y)
    for name in want:
        _close(got[name], want[name], name=name)
    with pytest.raises(ConfigError, match="'method' setting 'vmap'"):
        probes.per_example_loss_grads(model, nn.CrossEntropyLoss(), (x, y), method="vmap")


def test_coupling_that_only_the_gradient_shows_is_seen():
    """BatchRenorm with unclipped r, d: the forward value equals the running-statistics
    normalization (no example's value depends on the others), the gradient does not."""
    from normlab.nn import make_norm

    norm = make_norm("batch_renorm", 3, rmax=100.0, dmax=100.0, renorm_warmup=(0.0, 0.0))
    set_training_fraction(norm, 1.0)
    norm = norm.double().train()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    assert is_batch_coupled(norm, x)
    assert not is_batch_coupled(norm.eval(), x)


def test_coupling_is_decided_along_the_example_axis_found():
    time_first = nn.LayerNorm(4).double()  # (T, B, D): no coupling across dim 0 = time
    x = torch.randn(3, 5, 4, dtype=torch.float64)

    class SequenceFirst(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):  # (B, T, D) in, the layer sees (T, B, D)
            return self.inner(x.transpose(0, 1)).transpose(0, 1)

    assert not is_batch_coupled(SequenceFirst(time_first), x)

    class CentreOverBatchPerTime(nn.Module):
        def forward(self, h):  # (T, B, D): centre each time step over the batch
            return h - h.mean(dim=1, keepdim=True)

    assert is_batch_coupled(SequenceFirst(CentreOverBatchPerTime()), x)


def test_integer_input_is_tested_from_the_embedding_and_refused_without_one():
    class Tokens(nn.Module):
        def __init__(self, centre: bool) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 3)
            self.centre = centre

        def forward(self, t):  # (B, T)
            h = self.embed(t).mean(dim=1)
            return self.head(h - h.mean(dim=0) if self.centre else h)

    tokens = torch.randint(0, 7, (5, 3))
    assert not is_batch_coupled(Tokens(False).double(), tokens)
    assert is_batch_coupled(Tokens(True).double(), tokens)

    class OneHot(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(7, 3)

        def forward(self, t):
            return self.head(F.one_hot(t, 7).double().mean(dim=1))

    with pytest.raises(ConfigError, match="cannot tell whether the model couples"):
        is_batch_coupled(OneHot().double(), tokens)
    got = probes.per_example_loss_grads(OneHot().double(), nn.CrossEntropyLoss(),
                                        (tokens, torch.zeros(5, dtype=torch.long)))
    assert got.method == "vjp" and "integer input" in got.reason


def test_the_behaviour_tests_are_cached_and_leave_the_model_alone():
    calls = []
    torch.manual_seed(0)
    model = UserNormNet().double().train()
    model.conv.register_forward_pre_hook(lambda m, i: calls.append(1))
    x, _ = _images()
    before = model_snapshot(model)
    norm_layers(model, x)
    is_batch_coupled(model, x)
    example_axes(model, x)
    assert_unchanged(before, model)
    seen = len(calls)
    norm_layers(model, x)
    is_batch_coupled(model, x)
    example_axes(model, x)
    assert len(calls) == seen  # nothing ran again


# -- item 4: the example axis ---------------------------------------------------------------------

def test_example_axes_finds_folds_sequence_first_and_batch_free_tensors():
    class Layout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Linear(3, 3)
            self.strided = nn.Linear(3, 3)
            self.seq_first = nn.Linear(3, 3)
            self.query = nn.Linear(3, 3)
            self.q = nn.Parameter(torch.randn(2, 3))

        def forward(self, x):  # (B, T, F)
            b, t, f = x.shape
            h = self.blocks(x.reshape(b * t, f)).reshape(b, t, f)
            h = self.strided(h.transpose(0, 1).reshape(t * b, f)).reshape(t, b, f)
            h = self.seq_first(h)  # (T, B, F)
            return h.mean(dim=0) + self.query(self.q).sum(dim=0)

    x = torch.randn(4, 4, 3, dtype=torch.float64)  # T == B: a shape alone would not tell
    axes = example_axes(Layout().double(), x)
    assert axes.call("blocks", 0).received == (ExampleAxis(0, 4, False),)
    assert axes.call("strided", 0).received == (ExampleAxis(0, 4, True),)
    assert axes.call("seq_first", 0).output == ExampleAxis(1)
    assert axes.call("query", 0).received == (None,)


def test_contributions_on_a_sequence_first_layer_with_as_many_steps_as_examples():
    class SequenceFirstMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):  # (B, T, F) with T == B
            return self.head(torch.tanh(self.fc(x.transpose(0, 1))).mean(dim=0))

    torch.manual_seed(0)
    model = SequenceFirstMLP().double()
    x, y = torch.randn(4, 4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    got = probes.per_example_contributions(model, nn.CrossEntropyLoss(), (x, y))
    want = _loop_grads(model, x, y)
    for name in want:
        _close(got[name], want[name] / len(x), name=name)


def test_contributions_of_a_norm_over_folded_frames_equal_the_layer_copies():
    class FoldedNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Linear(3, 4)
            self.norm = nn.BatchNorm1d(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):  # (B, T, F): frames folded into the batch, normalized together
            b, t, f = x.shape
            h = torch.tanh(self.norm(self.encode(x.reshape(b * t, f))))
            return self.head(h.reshape(b, t, -1).mean(dim=1))

    torch.manual_seed(0)
    model = FoldedNorm().double().train()
    x, y = torch.randn(5, 3, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    got = probes.per_example_contributions(model, nn.CrossEntropyLoss(), (x, y))
    assert got["norm.weight"].shape == (5, 4)
    want = contributions_by_copies(model, nn.CrossEntropyLoss(), x, y,
                                   rows_per_example={"encode": 3, "norm": 3})
    for name in got:
        _close(got[name], want[name], name=name)


def test_a_layer_whose_input_does_not_follow_the_batch_is_refused_by_name():
    class LearnedQuery(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(2, 3))
            self.project = nn.Linear(3, 3)
            self.head = nn.Linear(3, 3)

        def forward(self, x):  # (B, 3)
            return self.head(x + self.project(self.query).mean(dim=0))

    model = LearnedQuery().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(ConfigError, match=r"'project.weight': the output of 'project' .*does "
                                          r"not depend on the batch"):
        probes.per_example_contributions(model, nn.CrossEntropyLoss(), (x, y))
    got = probes.per_example_contributions(model, nn.CrossEntropyLoss(), (x, y),
                                           params=["head.weight", "head.bias"])
    want = _loop_grads(model, x, y)
    _close(got["head.weight"], want["head.weight"] / len(x))


def test_a_model_that_refuses_the_doubled_batch_gets_its_contributions_refused():
    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x.reshape(5, 3))

    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(ConfigError, match="did not run on the batch twice over"):
        probes.per_example_contributions(FixedBatch().double(), nn.CrossEntropyLoss(), (x, y))


# -- item 5: a weight tied to an embedding --------------------------------------------------------

class FunctionalTie(nn.Module):
    """An LM whose output layer uses the embedding matrix in a functional call."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, tokens):  # (B, T)
        h = torch.tanh(self.mix(self.embed(tokens))).mean(dim=1)
        return F.linear(h, self.embed.weight)  # (B, 7)


def test_a_weight_tied_into_a_functional_call_is_refused_by_name():
    torch.manual_seed(0)
    model = FunctionalTie().double()
    tokens, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    with pytest.raises(ConfigError, match=r"'embed.weight'.*also used outside"):
        probes.per_example_contributions(model, nn.CrossEntropyLoss(), (tokens, y))
    got = probes.per_example_contributions(model, nn.CrossEntropyLoss(), (tokens, y),
                                           params=["mix.weight", "mix.bias"])
    want = _loop_grads(model, tokens, y)
    _close(got["mix.weight"], want["mix.weight"] / len(tokens))


def test_an_embedding_with_padding_and_frequency_scaling_matches_the_layer_copies():
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(6, 3, padding_idx=0, scale_grad_by_freq=True)
            self.head = nn.Linear(3, 3)

        def forward(self, t):
            return self.head(self.embed(t).sum(dim=1))

    torch.manual_seed(0)
    model = Bag().double()
    tokens = torch.tensor([[0, 1, 1], [2, 0, 3], [1, 5, 5], [4, 4, 4]])
    y = torch.randint(0, 3, (4,))
    got = probes.per_example_contributions(model, nn.CrossEntropyLoss(), (tokens, y))
    want = contributions_by_copies(model, nn.CrossEntropyLoss(), tokens, y)
    batch = _batch_gradient(model, tokens, y)
    _close(got["embed.weight"], want["embed.weight"])
    _close(got["embed.weight"].sum(0), batch["embed.weight"])


# -- item 6: parametrized layers ------------------------------------------------------------------

def _weight_norm_old_style(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module)


@pytest.mark.parametrize("wrap", [parametrizations.weight_norm, parametrizations.spectral_norm,
                                  _weight_norm_old_style, nn.utils.spectral_norm])
@pytest.mark.parametrize("conv", [nn.Conv2d, nn.ConvTranspose2d])
def test_contributions_of_parametrized_layers_equal_the_layer_copies(wrap, conv):
    torch.manual_seed(0)
    model = nn.Sequential(wrap(conv(2, 3, 3, padding=1)), nn.Tanh(),
                          nn.Flatten(), wrap(nn.Linear(27, 3))).double().train()
    x, y = _images()
    got = probes.per_example_contributions(model, nn.CrossEntropyLoss(), (x, y))
    assert set(got) == {n for n, _ in model.named_parameters()}
    want = contributions_by_copies(model, nn.CrossEntropyLoss(), x, y)
    for name in got:
        _close(got[name], want[name], name=name)


def test_the_gradient_histogram_of_a_weight_normed_conv_is_that_of_its_weight():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(2, 3, 3, padding=1)),
                          nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)).double()
    x, y = _images()
    rows = probes.gradient_histogram(model, nn.CrossEntropyLoss(), (x, y), layers=["0"])
    ref = copy.deepcopy(model)
    with nn.utils.parametrize.cached():
        weight = ref[0].weight
        (grad,) = torch.autograd.grad(F.cross_entropy(ref(x), y), weight)
    (top,) = [r["value"] for r in rows if r["quantity"] == "max"]
    assert top == pytest.approx(float(grad.max()), rel=1e-12)


# -- item 12: a user hook that changes a layer's output -------------------------------------------

@pytest.mark.parametrize("in_place", [False, True])
def test_a_hook_that_changes_a_layers_output_does_not_change_its_contributions(in_place):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if in_place:
        model[0].register_forward_hook(lambda m, i, o: o.mul_(2.0).add_(0.5))
    else:
        model[0].register_forward_hook(lambda m, i, o: 2.0 * o + 0.5)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = probes.per_example_contributions(model, nn.CrossEntropyLoss(), (x, y))
    want = _loop_grads(model, x, y)
    for name in want:
        _close(got[name], want[name] / len(x), name=name)


def test_global_module_hooks_are_refused():
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(ConfigError, match="global module hooks"):
            probes.per_example_contributions(nn.Linear(3, 2).double(), nn.CrossEntropyLoss(),
                                             (torch.randn(4, 3, dtype=torch.float64),
                                              torch.zeros(4, dtype=torch.long)))
    finally:
        handle.remove()


def test_mode_train_still_finds_the_norms_of_a_model_written_for_one_batch_size():
    class FixedBatchNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.norm = UserBatchNorm(3)
            self.fc = nn.Linear(27, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.norm(self.conv(x))).reshape(6, 27))

    model = FixedBatchNorm().double().eval()
    x, _ = _images()
    assert norm_layers(model, x).names == ("norm",)
    assert is_batch_coupled(model.train(), x)


def test_a_users_norm_with_a_parametrized_weight_is_still_a_norm():
    torch.manual_seed(0)
    model = UserNormNet().double()
    parametrizations.weight_norm(model.norm, "weight", dim=0)
    x, y = _images()
    assert norm_layers(model, x).names == ("norm",)
    model.train()
    got = probes.per_example_contributions(model, nn.CrossEntropyLoss(), (x, y))
    want = contributions_by_copies(model, nn.CrossEntropyLoss(), x, y)
    assert "norm.parametrizations.weight.original1" in got
    # The direction's rows are zero in exact arithmetic (weight_norm at dim=0 of a 1-D weight is
    # g * sign(v), flat in v): compare every parameter on the scale of all the rows.
    scale = max(float(w.abs().max()) for w in want.values())
    for name in got:
        assert (got[name] - want[name]).abs().max() <= 1e-9 * scale, name
