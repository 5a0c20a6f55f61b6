"""Forward passes that leave the user's tensors alone: parameters from a mapping, buffers private.

`Stateless(model)` runs `model` through `torch.func.functional_call` with its own copies of the
buffers, so BN running statistics and `num_batches_tracked` are updated (if at all) on the
copies, never on the model; and with any parameter replaced by a given tensor (a perturbed
weight, or a detached leaf to differentiate with respect to). The model's parameters are never
written, so a graph the user built before the probe still back-propagates. Forward hooks the
user registered run as usual.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call


class Stateless:
    """Call as `f(x, params)`: `model(x)` with `params` (name -> tensor) swapped in."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def __call__(self, x: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
                 ) -> torch.Tensor:
        state = {**self.buffers, **(params or {})}
        return functional_call(self.model, state, (x,), strict=False)


def leaves(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached aliases of `params` that require grad (no copy; the originals' flags and
    version counters are untouched), to differentiate with respect to."""
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}
