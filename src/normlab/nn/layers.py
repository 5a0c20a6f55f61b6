"""Weight layers by name and depth: the index that probes and figures use to refer to layers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class LayerInfo:
    """One conv or linear layer: its module name, its 1-based depth and the module itself.

    `main_path` is False for layers off the main path (ResNet "B" shortcut convs); such a layer
    gets the depth of the main-path layer whose output it is added to (its block's conv2).
    """

    name: str
    depth: int
    module: nn.Module
    main_path: bool = True


def weight_layers(model: nn.Module) -> list[LayerInfo]:
    """The conv and linear layers of `model` in forward order, numbered by depth.

    Depth counts main-path weight layers from 1 (the stem conv of a ResNet, the first linear
    layer of an MLP) to the classifier. A layer whose name has a `shortcut` component is off the
    main path: it shares the depth of the previous main-path layer and does not advance the
    count, so `max(depth)` is the network's nominal depth (110 for ResNet-110).
    Order is module registration order, which for normlab's models is forward order; for other
    models it is the order the modules were assigned in `__init__`.
    """
    layers: list[LayerInfo] = []
    depth = 0
    for name, module in model.named_modules():
        if not isinstance(module, _WEIGHT_LAYERS):
            continue
        main = "shortcut" not in name.split(".")
        if main:
            depth += 1
        layers.append(LayerInfo(name, max(depth, 1), module, main))
    return layers
