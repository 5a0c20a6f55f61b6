"""Shared plumbing for probes I: which modules a probe looks at, and hooks that always go away.

Layers are named as `normlab.nn.weight_layers` names them (module names such as
`stage2.block5.conv1`, 1-based `depth` in forward order over Conv2d/Linear layers). A probe's
`layers` argument accepts module names, depth indices, or None (every weight layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from normlab.nn import weight_layers as nn_weight_layers
from normlab.utils.config import ConfigError


@dataclass(frozen=True)
class Layer:
    """A module a probe measures: its name, its weight-layer depth (None if not one), itself."""

    name: str
    depth: int | None
    module: nn.Module
    main_path: bool = True


def weight_layers(model: nn.Module) -> list[Layer]:
    """Conv2d/Linear layers in forward order with their depth (normlab.nn's numbering)."""
    return [Layer(info.name, info.depth, info.module, info.main_path)
            for info in nn_weight_layers(model)]


def depth_of(model: nn.Module) -> dict[str, int]:
    """Module name -> depth of every weight layer."""
    return {layer.name: layer.depth for layer in weight_layers(model)}


def select_layers(model: nn.Module, layers: Sequence[str | int] | None,
                  kinds: tuple[type, ...] | None = None) -> list[Layer]:
    """The modules named (or numbered by depth) in `layers`; every weight layer when None.

    A depth picks the main-path layer of that depth (not a ResNet shortcut conv sharing it).

    `kinds` restricts the choice (e.g. Conv2d only); a name or depth that is not there, or not
    of an allowed kind, raises ConfigError listing what is allowed.
    """
    available = weight_layers(model)
    if kinds is not None:
        available = [layer for layer in available if isinstance(layer.module, kinds)]
    if layers is None:
        return available
    if isinstance(layers, (str, int)):
        layers = [layers]
    by_name = {layer.name: layer for layer in available}
    by_depth = {layer.depth: layer for layer in available if layer.main_path}
    modules = dict(model.named_modules())
    depths = depth_of(model)
    chosen = []
    for key in layers:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ConfigError(f"The 'layers' setting must list module names or depth indices; "
                              f"got {key!r}.")
        if isinstance(key, int):
            if key not in by_depth:
                raise ConfigError.choice("layers", key, sorted(by_depth))
            chosen.append(by_depth[key])
        elif key in by_name:
            chosen.append(by_name[key])
        elif kinds is None and key in modules and key:
            chosen.append(Layer(key, depths.get(key), modules[key]))
        else:
            raise ConfigError.choice("layers", key, list(by_name))
    return chosen


def param_layers(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """Parameter name -> (owning module name, depth of that module or None)."""
    depths = depth_of(model)
    out = {}
    for name, _ in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        out[name] = (owner, depths.get(owner))
    return out


def select_params(model: nn.Module, params: Iterable[str] | None) -> dict[str, nn.Parameter]:
    """Named parameters: those in `params` (frozen ones included: a probe differentiates with
    respect to detached copies), or every parameter that requires grad."""
    named = dict(model.named_parameters())
    if params is None:
        chosen = {k: p for k, p in named.items() if p.requires_grad}
        if not chosen:
            raise ConfigError("The model has no parameter that requires grad, so there is "
                              "nothing to differentiate; pass the 'params' setting (names of "
                              f"parameters, frozen ones allowed) from {list(named)}.")
        return chosen
    if isinstance(params, str):
        params = [params]
    out = {}
    for key in params:
        if key not in named:
            raise ConfigError.choice("params", key, list(named))
        out[key] = named[key]
    if not out:
        raise ConfigError("The 'params' setting must name at least one parameter; got none.")
    return out


def canonical_names(model: nn.Module) -> dict[tuple[str, str], str]:
    """(module name, local parameter name) -> the parameter's name in
    `model.named_parameters()`; a weight tied across modules maps to its one canonical name."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {(m_name, p_name): by_id[id(p)]
            for m_name, module in model.named_modules(remove_duplicate=False)
            for p_name, p in module.named_parameters(recurse=False) if id(p) in by_id}


@contextlib.contextmanager
def hooks_removed(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[list]:
    """Yield a list to append hook handles to; every handle is removed on exit, even on error."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


def tensor_used(module: nn.Module, name: str,
                parametrized: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor | None:
    """The tensor `module`'s forward used as `name` (e.g. "weight"): its parameter (or the tensor
    a functional call swapped in), the latest output of its parametrization (from
    `parametrization_outputs`), or what an old-style weight_norm/spectral_norm hook computed."""
    if name in module._parameters:
        return module._parameters[name]
    if parametrize.is_parametrized(module, name):
        return parametrized.get((id(module), name))
    value = module.__dict__.get(name)
    return value if isinstance(value, torch.Tensor) else None


@contextlib.contextmanager
def parametrization_outputs(modules: Iterable[nn.Module]
                            ) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """Within the block, the latest output of each parametrization of `modules` (the tensor a
    forward reading `module.weight` got, with its graph), by (id(module), tensor name)."""
    latest: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keep(key: tuple[int, str]):
        return lambda _module, _inputs, output: latest.__setitem__(key, output)

    for module in modules:
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                handles.append(plist.register_forward_hook(keep((id(module), name))))
    with hooks_removed(handles):
        yield latest


def padded_conv_input(conv: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """The input as the conv sees it after its padding (any mode, 'same' or 'valid')."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(a, conv._reversed_padding_repeated_twice, mode=mode)
