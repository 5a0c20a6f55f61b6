"""Forward passes that leave the user's tensors alone: parameters from a mapping, buffers private.

`Stateless(model)` runs `model` through `torch.func.functional_call` with its own copies of the
buffers, so BN running statistics and `num_batches_tracked` are updated (if at all) on the
copies, never on the model; and with any parameter replaced by a given tensor (a perturbed
weight, or a detached leaf to differentiate with respect to). Each call starts from the buffers
as they were when `Stateless` was made, so a probe over several batches measures one function
at one state whatever their order (BatchRenorm's train-mode output reads its running
statistics); `carry_buffers=True` lets the updates carry over from call to call instead, as in
training (the lr range test). The model's parameters are never
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

    def __init__(self, model: nn.Module, carry_buffers: bool = False) -> None:
        self.model = model
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.carry_buffers = carry_buffers

    def __call__(self, x: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
                 ) -> torch.Tensor:
        buffers = self.buffers if self.carry_buffers else {
            n: b.clone() for n, b in self.buffers.items()}
        state = {**buffers, **(params or {})}
        return functional_call(self.model, state, (x,), strict=False)


def leaves(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached aliases of `params` that require grad (no copy; the originals' flags and
    version counters are untouched), to differentiate with respect to."""
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}
