"""Models: parameter counts, shapes, names, depth indices, shortcuts and settings refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.nn import build_model, list_norms, mlp, plain_cnn, resnet_cifar, weight_layers
from normlab.utils.config import ConfigError


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet_count_by_hand(depth: int, width: int = 16, in_channels: int = 3,
                          classes: int = 10) -> int:
    """3x3 convs without bias, each followed by BN (2 parameters per channel); shortcut A."""
    n = (depth - 2) // 6
    total = 9 * in_channels * width + 2 * width
    c_prev = width
    for c in (width, 2 * width, 4 * width):
        for _ in range(n):
            total += 9 * c_prev * c + 2 * c + 9 * c * c + 2 * c
            c_prev = c
    return total + 4 * width * classes + classes


@pytest.mark.parametrize("depth, published", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_resnet_parameter_counts(depth, published):
    count = _count(resnet_cifar(depth, seed=0))
    assert count == _resnet_count_by_hand(depth)
    assert count == pytest.approx(published, rel=0.03)  # He et al. 2016, table 6


def test_resnet20_exact_counts_by_variant():
    assert _count(resnet_cifar(20)) == 269_722
    # without norm every conv gets a bias (c) instead of the BN scale and shift (2c)
    norm_channels = 16 + 6 * (16 + 32 + 64)
    assert _count(resnet_cifar(20, norm="none")) == 269_722 - norm_channels
    # shortcut B adds two 1x1 projections, each with a BN
    assert _count(resnet_cifar(20, shortcut="B")) == 269_722 + (16 * 32 + 64) + (32 * 64 + 128)


@pytest.mark.parametrize("factory", [resnet_cifar, plain_cnn])
def test_output_shapes(factory):
    model = factory(8, width=4, num_classes=7, seed=0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    digits = factory(20, in_channels=1, seed=0)  # 8x8 digits: stages at 8, 4, 2 pixels
    assert digits(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("depth", [21, 2, 0, 19, 24, True, "20", 20.0])
def test_bad_depths_refused(depth):
    for factory in (resnet_cifar, plain_cnn):
        with pytest.raises(ConfigError, match="'depth' setting must be 6n\\+2") as err:
            factory(depth)
        assert repr(depth) in str(err.value)


@pytest.mark.parametrize("setting, value", [
    ("shortcut", "C"), ("norm_placement", "everywhere"), ("width", 0), ("num_classes", 0),
    ("in_channels", -1), ("norm", "bogus"), ("init", "bogus"),
])
def test_bad_settings_refused(setting, value):
    with pytest.raises(ConfigError, match=f"'{setting}'"):
        resnet_cifar(8, **{setting: value})


def test_names_follow_the_scheme():
    model = resnet_cifar(56, shortcut="B", seed=0)
    names = dict(model.named_modules())
    for name in ("stem.conv", "stem.norm", "stage2.block5.conv1", "stage3.block9.norm2",
                 "stage2.block1.shortcut.conv", "stage2.block1.shortcut.norm", "final_norm",
                 "head.fc"):
        assert name in names, name
    assert "stage1.block1.shortcut.conv" not in names  # identity where the shape is kept
    assert "stage1.block10" not in names


def test_weight_layers_of_resnet110():
    layers = weight_layers(resnet_cifar(110, seed=0))
    main = [info for info in layers if info.main_path]
    assert len(main) == len(layers) == 110
    assert [info.depth for info in main] == list(range(1, 111))
    assert sum(isinstance(i.module, nn.Conv2d) for i in main) == 109
    assert isinstance(main[-1].module, nn.Linear) and main[-1].name == "head.fc"
    by_depth = {info.depth: info.name for info in main}
    # the paper's layers: 8, 44 and 80 (E5) and 55, the middle of the network (E3)
    assert by_depth[1] == "stem.conv"
    assert by_depth[8] == "stage1.block4.conv1"
    assert by_depth[44] == "stage2.block4.conv1"
    assert by_depth[55] == "stage2.block9.conv2"
    assert by_depth[80] == "stage3.block4.conv1"


def test_shortcut_convs_are_off_the_main_path():
    layers = weight_layers(resnet_cifar(20, shortcut="B", seed=0))
    side = {info.name: info.depth for info in layers if not info.main_path}
    # a projection shares the depth of the conv whose output it is added to
    assert side == {"stage2.block1.shortcut.conv": 9, "stage3.block1.shortcut.conv": 15}
    assert max(info.depth for info in layers) == 20


def test_forward_order_of_weight_layers():
    model = resnet_cifar(8, shortcut="B", width=4, seed=0)
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [info.module.register_forward_hook(lambda m, i, o: order.append(names[m]))
             for info in weight_layers(model)]
    model(torch.randn(2, 3, 8, 8))
    for h in hooks:
        h.remove()
    main_order = [n for n in order if "shortcut" not in n]
    assert main_order == [i.name for i in weight_layers(model) if i.main_path]


def test_conv_bias_only_without_following_norm():
    with_bn = resnet_cifar(8, norm="batch", width=4)
    no_norm = resnet_cifar(8, norm="none", width=4)
    for info in weight_layers(with_bn)[:-1]:
        assert info.module.bias is None, info.name
    assert all(info.module.bias is not None for info in weight_layers(no_norm))


def test_single_norm_placement():
    model = resnet_cifar(20, norm="group", norm_placement="single", seed=0)
    norm_layers = [n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    assert norm_layers == ["final_norm"]
    assert model.final_norm.num_channels == 64
    assert all(info.module.bias is not None for info in weight_layers(model))
    assert isinstance(resnet_cifar(8, width=4).final_norm, nn.Identity)


def test_shortcut_a_is_strided_zero_padded_identity():
    """With zero convs and no norm, a transition block outputs relu(shortcut(x))."""
    model = resnet_cifar(8, norm="none", width=2, seed=0).double()
    block = model.stage2.block1
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    expected = torch.zeros(3, 4, 3, 3, dtype=torch.float64)
    expected[:, :2] = torch.relu(x[:, :, ::2, ::2])
    torch.testing.assert_close(block(x), expected)


def test_residual_connection_present_only_in_resnet():
    """Ground truth: zeroing every block's second conv makes a ResNet's blocks identities."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).abs()
    res = resnet_cifar(14, norm="none", width=4, seed=0).double()
    plain = plain_cnn(14, norm="none", width=4, seed=0).double()
    assert _count(res) == _count(plain)
    with torch.no_grad():
        for model in (res, plain):
            for b in model.stage1:
                b.conv2.weight.zero_()
                b.conv2.bias.zero_()
    torch.testing.assert_close(res.stage1(x), x)  # relu(0 + x) = x for x >= 0
    assert torch.count_nonzero(plain.stage1(x)) == 0
    assert not any("shortcut" in n for n, _ in plain.named_modules())


@pytest.mark.parametrize("norm", list_norms())
def test_every_norm_trains_a_resnet_step(norm):
    options = {"groups": 2} if norm == "group" else None
    model = resnet_cifar(8, norm=norm, width=4, in_channels=1, norm_options=options, seed=0)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_deep_linear_mlp_is_product_of_matrices():
    model = mlp([5, 6, 6, 4], activation="linear", bias=False, init="orthogonal", seed=0).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    w = [model.get_submodule(f"layer{i}.linear").weight for i in (1, 2, 3)]
    torch.testing.assert_close(model(x), x @ (w[2] @ w[1] @ w[0]).T)


def test_mlp_structure_and_flattening():
    model = mlp([16, 8, 8], activation="tanh", norm="layer", num_classes=3, seed=0).double()
    names = [n for n, _ in model.named_modules()]
    assert names[1:] == ["layer1", "layer1.linear", "layer1.norm", "layer2", "layer2.linear",
                         "layer2.norm", "layer3", "layer3.linear", "layer3.norm"]
    assert isinstance(model.layer3.norm, nn.Identity)  # output layer: linear only
    assert model.layer1.linear.bias is None and model.layer3.linear.bias is not None
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    h = x.flatten(1)
    for i in (1, 2):
        layer = model.get_submodule(f"layer{i}")
        h = torch.tanh(layer.norm(layer.linear(h)))
    torch.testing.assert_close(model(x), model.layer3.linear(h))
    assert [i.depth for i in weight_layers(model)] == [1, 2, 3]


@pytest.mark.parametrize("kwargs, setting", [
    ({"widths": [5]}, "'widths'"), ({"widths": [5, 0]}, "'widths'"),
    ({"widths": [5, 3], "activation": "gelu"}, "'activation'"),
    ({"widths": [5, 3, 2], "norm": "instance"}, "'norm'"),
    ({"widths": [5, 3, 2], "norm": "bogus"}, "'norm'"),
])
def test_mlp_bad_settings_refused(kwargs, setting):
    with pytest.raises(ConfigError, match=setting):
        mlp(**kwargs)


def _spec_kwargs(**changes):
    base = dict(depth=8, width=4, norm="batch", norm_options={}, norm_placement="every_conv",
                init="kaiming_normal", init_gain=1.0, num_classes=10, in_channels=1, seed=0)
    return {**base, **changes}


def test_build_model_each_family():
    x = torch.randn(2, 1, 8, 8)
    res = build_model("resnet", **_spec_kwargs())
    again = build_model("resnet", **_spec_kwargs()).state_dict()
    assert all(torch.equal(again[k], v) for k, v in res.state_dict().items())  # seeded
    plain = build_model("plain_cnn", **_spec_kwargs())
    net = build_model("mlp", **_spec_kwargs(depth=4, width=12, input_shape=(1, 8, 8)))
    assert res(x).shape == plain(x).shape == net(x).shape == (2, 10)
    assert any("shortcut" in n for n, _ in res.named_modules())
    assert [(i.name, i.module.weight.shape) for i in weight_layers(net)] == [
        ("layer1.linear", (12, 64)), ("layer2.linear", (12, 12)), ("layer3.linear", (12, 12)),
        ("layer4.linear", (10, 12))]


@pytest.mark.parametrize("name, changes, setting", [
    ("vit", {}, "'model'"),
    ("mlp", {}, "'input_shape'"),
    ("mlp", {"depth": 0, "input_shape": (1, 8, 8)}, "'depth'"),
    ("mlp", {"norm_placement": "single", "input_shape": (1, 8, 8)}, "'norm_placement'"),
    ("resnet", {"depth": 9}, "'depth'"),
])
def test_build_model_refuses_bad_settings(name, changes, setting):
    with pytest.raises(ConfigError, match=setting):
        build_model(name, **_spec_kwargs(**changes))


def test_seeded_models_leave_global_rng_untouched():
    state = torch.get_rng_state()
    resnet_cifar(8, width=4, seed=1)
    mlp([4, 3], seed=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_public_surface():
    import normlab
    import normlab.nn

    for name in normlab.nn.__all__:
        assert getattr(normlab.nn, name) is not None, name
    for name in ("resnet_cifar", "plain_cnn", "mlp", "make_norm", "list_norms", "register_norm",
                 "BatchRenorm", "initialize", "list_inits", "register_init"):
        assert getattr(normlab, name) is getattr(normlab.nn, name)


def test_runspec_checks_plain_cnn_depth():
    from normlab.runs.spec import RunSpec

    with pytest.raises(ConfigError, match="'depth' setting must be 6n\\+2"):
        RunSpec(model="plain_cnn", depth=21)
    with pytest.raises(ConfigError, match="'depth'"):
        RunSpec(model="resnet", depth=2)
    assert RunSpec(model="mlp", depth=3).depth == 3
