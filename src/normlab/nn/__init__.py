"""Models with pluggable normalization and initialization, and layer naming.

    from normlab.nn import resnet_cifar, make_norm, initialize, weight_layers
    model = resnet_cifar(110, norm="batch_renorm", init="xavier_normal", seed=0,
                         norm_options={"rmax": 3.0, "dmax": 5.0, "renorm_warmup": (0.05, 0.5)})
    set_training_fraction(model, step / total_steps)     # every step (BatchRenorm schedule)
    [(info.name, info.depth) for info in weight_layers(model)][54]  # ("stage2.block9.conv2", 55)

See docs/norms_and_init.md for the conventions.
"""

from __future__ import annotations

from normlab.nn.batch_renorm import BatchRenorm, set_training_fraction
from normlab.nn.coupling import NormLayers, is_batch_coupled, norm_layers
from normlab.nn.example_axes import ExampleAxis, example_axes
from normlab.nn.factory import MODELS, build_model
from normlab.nn.init import initialize, list_inits, register_init, weight_sampler
from normlab.nn.layers import LayerInfo, weight_layers
from normlab.nn.mlp import MLP, mlp
from normlab.nn.norms import (
    BatchNorm,
    InstanceNorm,
    LayerNormChannels,
    list_norms,
    make_norm,
    register_norm,
)
from normlab.nn.plain import plain_cnn
from normlab.nn.resnet import CifarConvNet, resnet_cifar

__all__ = [
    "MLP",
    "MODELS",
    "BatchNorm",
    "BatchRenorm",
    "CifarConvNet",
    "ExampleAxis",
    "InstanceNorm",
    "LayerInfo",
    "LayerNormChannels",
    "NormLayers",
    "build_model",
    "example_axes",
    "initialize",
    "is_batch_coupled",
    "list_inits",
    "list_norms",
    "make_norm",
    "mlp",
    "norm_layers",
    "plain_cnn",
    "register_init",
    "register_norm",
    "resnet_cifar",
    "set_training_fraction",
    "weight_layers",
    "weight_sampler",
]
