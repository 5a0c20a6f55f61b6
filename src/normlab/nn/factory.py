"""One entry point from RunSpec-style settings to a model: `build_model`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from normlab.nn.mlp import mlp
from normlab.nn.plain import plain_cnn
from normlab.nn.resnet import resnet_cifar
from normlab.utils.config import ConfigError, check_choice, check_interval

MODELS = ("resnet", "plain_cnn", "mlp")


def build_model(model_name: str, *, depth: int, width: int, norm: str,
                norm_options: Mapping[str, Any] | None = None,
                norm_placement: str = "every_conv", init: str = "kaiming_normal",
                init_gain: float = 1.0, num_classes: int = 10, in_channels: int = 3,
                seed: int | None = None,
                input_shape: Sequence[int] | None = None) -> nn.Module:
    """Build and initialize "resnet" | "plain_cnn" | "mlp" from RunSpec-style settings.

    - "resnet": `resnet_cifar(depth, ...)` with shortcut "A"; depth = 6n+2.
    - "plain_cnn": `plain_cnn(depth, ...)`; depth = 6n+2.
    - "mlp": `depth` linear layers: depth-1 hidden layers of `width` units (ReLU, `norm` after
      each) and an output layer to `num_classes`; input flattened, so `input_shape` (C, H, W)
      of one example is required. `norm_placement` must be "every_conv" (a norm after every
      hidden layer).
    """
    check_choice("model", model_name, MODELS)
    if model_name == "resnet":
        return resnet_cifar(depth, norm=norm, init=init, width=width, num_classes=num_classes,
                            in_channels=in_channels, norm_placement=norm_placement,
                            norm_options=norm_options, init_gain=init_gain, seed=seed)
    if model_name == "plain_cnn":
        return plain_cnn(depth, norm=norm, init=init, width=width, num_classes=num_classes,
                         in_channels=in_channels, norm_placement=norm_placement,
                         norm_options=norm_options, init_gain=init_gain, seed=seed)
    check_interval("depth", depth, 1, kind=int, low_open=False)
    check_choice("norm_placement", norm_placement, ["every_conv"])
    if input_shape is None:
        raise ConfigError("The 'input_shape' setting must give the (C, H, W) shape of one "
                          "example for an MLP (its first layer has C*H*W inputs); got None.")
    in_features = math.prod(input_shape)
    return mlp([in_features, *[width] * (depth - 1)], activation="relu", norm=norm, init=init,
               num_classes=num_classes, seed=seed, norm_options=norm_options,
               init_gain=init_gain)
