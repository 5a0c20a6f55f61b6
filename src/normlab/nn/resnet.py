"""The CIFAR ResNet of He et al. 2016 (sec. 4.2), with pluggable normalization and init.

    stem:   conv3x3(in -> w) - norm - relu                                    (N, w, H, W)
    stage1: n basic blocks, w channels                                         (N, w, H, W)
    stage2: n basic blocks, 2w channels, the first with stride 2               (N, 2w, H/2, W/2)
    stage3: n basic blocks, 4w channels, the first with stride 2               (N, 4w, H/4, W/4)
    final_norm (only with norm_placement="single") - global average pool - head.fc

Depth = 6n + 2 weight layers on the main path (stem conv, 2 convs per block, fc): 20, 32, 44,
56, 110, ... A basic block is post-activation: conv-norm-relu-conv-norm, add the shortcut, relu.
Shortcut "A" is parameter-free: the input subsampled with the block's stride and zero-padded
with the new channels (appended after the existing ones). Shortcut "B" is conv1x1 (stride 2) -
norm, used only where the shape changes; elsewhere the shortcut is the identity.

Every norm slot always exists (stable names); it is `nn.Identity` where no normalization sits:
with norm="none", or inside the blocks and stem when norm_placement="single". A conv has a bias
exactly when its norm slot is empty (a bias before a mean-subtracting norm is cancelled by it).
`plain_cnn` (normlab.nn.plain) is the same network without the shortcuts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normlab.nn.init import initialize
from normlab.nn.norms import make_norm
from normlab.utils.config import ConfigError, check_choice, check_interval

NormSpec = str | Callable[..., nn.Module]
PLACEMENTS = ("every_conv", "single")
SHORTCUTS = ("A", "B")


def _conv3x3(c_in: int, c_out: int, stride: int, norm: nn.Module) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1,
                     bias=isinstance(norm, nn.Identity))


class ConvNormReLU(nn.Module):
    """conv3x3 - norm - relu: the stem."""

    def __init__(self, c_in: int, c_out: int, norm: nn.Module) -> None:
        super().__init__()
        self.conv = _conv3x3(c_in, c_out, 1, norm)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class ShortcutA(nn.Module):
    """He et al.'s option A: strided identity, new channels filled with zeros (no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = c_out - c_in
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))  # (N, c_out, H/s, W/s)


class ShortcutB(nn.Module):
    """He et al.'s option B: conv1x1 with stride - norm (a projection)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=isinstance(norm, nn.Identity))
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class BasicBlock(nn.Module):
    """conv-norm-relu-conv-norm (+ shortcut) - relu; `shortcut=None` makes it a plain block."""

    def __init__(self, c_in: int, c_out: int, stride: int, make: Callable[[int], nn.Module],
                 shortcut: str | None) -> None:
        super().__init__()
        norm1 = make(c_out)
        self.conv1 = _conv3x3(c_in, c_out, stride, norm1)
        self.norm1 = norm1
        norm2 = make(c_out)
        self.conv2 = _conv3x3(c_out, c_out, 1, norm2)
        self.norm2 = norm2
        self.residual = shortcut is not None
        if shortcut is None:
            return
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(c_in, c_out, stride)
        else:
            self.shortcut = ShortcutB(c_in, c_out, stride, make(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return torch.relu(out)


class Head(nn.Module):
    """Global average pool over positions, then the linear classifier `fc`."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))  # (N, C, H, W) -> (N, num_classes)


class CifarConvNet(nn.Module):
    """stem - stage1..3 of basic blocks - final_norm - head: a CIFAR ResNet or its plain twin."""

    def __init__(self, blocks_per_stage: int, norm: NormSpec, width: int, num_classes: int,
                 in_channels: int, shortcut: str | None, norm_placement: str,
                 norm_options: Mapping[str, Any]) -> None:
        super().__init__()
        every = norm_placement == "every_conv"

        def make(channels: int) -> nn.Module:
            return make_norm(norm, channels, **norm_options) if every else nn.Identity()

        self.stem = ConvNormReLU(in_channels, width, make(width))
        c_in = width
        for s, c_out in enumerate((width, 2 * width, 4 * width), start=1):
            blocks = OrderedDict()
            for b in range(1, blocks_per_stage + 1):
                stride = 2 if s > 1 and b == 1 else 1
                blocks[f"block{b}"] = BasicBlock(c_in, c_out, stride, make, shortcut)
                c_in = c_out
            self.add_module(f"stage{s}", nn.Sequential(blocks))
        # The single-norm variant: one normalization layer after the last stage, before pooling.
        self.final_norm = nn.Identity() if every else make_norm(norm, c_in, **norm_options)
        self.head = Head(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, w, H, W)
        x = self.stage3(self.stage2(self.stage1(x)))  # (N, 4w, H/4, W/4)
        return self.head(self.final_norm(x))  # (N, num_classes)


def blocks_for_depth(depth: int, what: str = "a CIFAR ResNet") -> int:
    """n for depth = 6n + 2; ConfigError for any other depth."""
    if (isinstance(depth, bool) or not isinstance(depth, int) or depth < 8
            or (depth - 2) % 6):
        raise ConfigError(f"The 'depth' setting must be 6n+2 for {what} (8, 14, 20, 32, 44, 56, "
                          f"110, ...); got {depth!r}.")
    return (depth - 2) // 6


def build_cifar_net(depth: int, norm: NormSpec, init: str, width: int, num_classes: int,
                    in_channels: int, shortcut: str | None, norm_placement: str,
                    norm_options: Mapping[str, Any] | None, init_gain: float,
                    seed: int | None, what: str) -> CifarConvNet:
    """Validate the settings, build the network and initialize it (see `resnet_cifar`)."""
    n = blocks_for_depth(depth, what)
    for setting, value in (("width", width), ("num_classes", num_classes),
                           ("in_channels", in_channels)):
        check_interval(setting, value, 1, kind=int, low_open=False)
    check_choice("norm_placement", norm_placement, PLACEMENTS)
    # Building draws torch's default init from the global RNG; with a seed, do it on a private
    # copy so that a seeded model leaves the global RNG untouched.
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        model = CifarConvNet(n, norm, width, num_classes, in_channels, shortcut,
                             norm_placement, dict(norm_options or {}))
    return initialize(model, init, gain=init_gain, seed=seed)


def resnet_cifar(depth: int, norm: NormSpec = "batch", init: str = "kaiming_normal",
                 width: int = 16, num_classes: int = 10, in_channels: int = 3,
                 shortcut: str = "A", norm_placement: str = "every_conv",
                 norm_options: Mapping[str, Any] | None = None, init_gain: float = 1.0,
                 seed: int | None = None) -> CifarConvNet:
    """The He et al. 2016 CIFAR ResNet of `depth` = 6n+2 weight layers (20, 56, 110, ...).

    `norm` is a `make_norm` kind (or factory) with `norm_options`; `norm_placement` is
    "every_conv" (after every conv, the standard) or "single" (one norm layer after the last
    stage only). `init`/`init_gain`/`seed` go to `initialize`. Works for any input size of at
    least 4x4 (e.g. 8x8 digits with in_channels=1). Layer names: `stem.conv`, `stem.norm`,
    `stage{s}.block{b}.conv1|norm1|conv2|norm2`, `stage{s}.block1.shortcut.conv|norm`
    (shortcut "B"), `final_norm`, `head.fc`.
    """
    check_choice("shortcut", shortcut, SHORTCUTS)
    return build_cifar_net(depth, norm, init, width, num_classes, in_channels, shortcut,
                           norm_placement, norm_options, init_gain, seed, "a CIFAR ResNet")
