"""The plain (non-residual) twin of the CIFAR ResNet, for depth studies (He et al. 2016, fig. 6).

Same stem, stages, blocks, norm slots, names and depth rule (depth = 6n + 2 weight layers:
20, 32, 44, 56, 110, ...) as `resnet_cifar`, but no block has a shortcut: each block is
conv-norm-relu-conv-norm-relu and the stride-2 first conv of a stage changes the shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from normlab.nn.resnet import CifarConvNet, NormSpec, build_cifar_net


def plain_cnn(depth: int, norm: NormSpec = "batch", init: str = "kaiming_normal",
              width: int = 16, num_classes: int = 10, in_channels: int = 3,
              norm_placement: str = "every_conv",
              norm_options: Mapping[str, Any] | None = None, init_gain: float = 1.0,
              seed: int | None = None) -> CifarConvNet:
    """A CIFAR ResNet of `depth` = 6n+2 without residual connections (see `resnet_cifar`).

    Layer names: `stem.conv`, `stem.norm`, `stage{s}.block{b}.conv1|norm1|conv2|norm2`,
    `final_norm`, `head.fc`.
    """
    return build_cifar_net(depth, norm, init, width, num_classes, in_channels, None,
                           norm_placement, norm_options, init_gain, seed, "a plain CIFAR CNN")
