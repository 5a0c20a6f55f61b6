"""Deep MLPs and deep linear networks, for random-matrix and signal-propagation studies.

`mlp(widths)` with widths = [d_0, d_1, ..., d_L] has L linear layers `layer{i}.linear`
(d_{i-1} -> d_i). Layers 1 .. L-1 are hidden: linear - norm - activation. Layer L is the output
layer: linear only (its `norm` slot is `nn.Identity`, no activation). `num_classes`, when given,
appends one more output layer: widths + [num_classes]. Image input (N, C, H, W) is flattened,
so d_0 = C * H * W. activation="linear" with norm="none" and bias=False is a deep linear network:
the product of the weight matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from normlab.nn.init import initialize
from normlab.nn.norms import make_norm
from normlab.utils.config import ConfigError, check_choice, check_interval

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


class MLPLayer(nn.Module):
    """linear - norm - activation (the output layer: linear only)."""

    def __init__(self, d_in: int, d_out: int, norm: nn.Module, activation: str, bias: bool) -> None:
        super().__init__()
        # A bias before a mean-subtracting norm is cancelled by it, so such a layer has none.
        self.linear = nn.Linear(d_in, d_out, bias=bias and isinstance(norm, nn.Identity))
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](self.norm(self.linear(x)))  # (N, d_out)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class MLP(nn.Module):
    """flatten - layer1 - ... - layerL."""

    def __init__(self, widths: Sequence[int], activation: str, norm: Any,
                 norm_options: Mapping[str, Any], bias: bool) -> None:
        super().__init__()
        last = len(widths) - 1
        for i in range(1, last + 1):
            hidden = i < last
            slot = make_norm(norm, widths[i], **norm_options) if hidden else nn.Identity()
            layer = MLPLayer(widths[i - 1], widths[i], slot, activation if hidden else "linear",
                             bias)
            self.add_module(f"layer{i}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (N, d_0)
        for layer in self.children():
            x = layer(x)
        return x  # (N, d_L)


def mlp(widths: Sequence[int], activation: str = "relu", norm: Any = "none",
        init: str = "kaiming_normal", num_classes: int | None = None, bias: bool = True,
        seed: int | None = None, norm_options: Mapping[str, Any] | None = None,
        init_gain: float = 1.0) -> MLP:
    """An MLP with layer sizes `widths` (+ [num_classes]); see the module docstring.

    Layer names: `layer{i}.linear`, `layer{i}.norm` (i = 1 .. number of linear layers).
    norm="instance" is refused: a single value per channel has no variance.
    """
    sizes = [*widths, *([] if num_classes is None else [num_classes])]
    if len(sizes) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                             for w in sizes):
        raise ConfigError("The 'widths' setting must list at least two positive ints (input "
                          f"size, ..., output size); got {list(widths)!r} with "
                          f"num_classes={num_classes!r}.")
    check_choice("activation", activation, ACTIVATIONS)
    if norm == "instance":
        raise ConfigError("The 'norm' setting 'instance' needs spatial positions; an MLP allows "
                          "'none', 'batch', 'group', 'layer', 'batch_renorm'.")
    check_choice("bias", bias, [True, False])
    if seed is not None:
        check_interval("seed", seed, 0, kind=int, low_open=False)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        model = MLP(sizes, activation, norm, dict(norm_options or {}), bias)
    return initialize(model, init, gain=init_gain, seed=seed)
