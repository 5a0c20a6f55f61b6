"""Forward passes that leave the user's tensors alone: parameters from a mapping, buffers private.

`Stateless(model)` runs `model` through `torch.func.functional_call` with its own copies of the
buffers, so BN running statistics and `num_batches_tracked` are updated (if at all) on the
copies, never on the model; and with any parameter replaced by a given tensor (a perturbed
weight, or a detached leaf to differentiate with respect to). Each call starts from the buffers
as they were when `Stateless` was made, so a probe over several batches measures one function
at one state whatever their order (BatchRenorm's train-mode output reads its running
statistics); `carry_buffers=True` lets the updates carry over from call to call instead, as in
training (the lr range test). `dtype` runs the forward at another floating precision (the
buffer copies cast; the caller passes every parameter, cast, and the input). The model's
parameters are never written, so a graph the user built before the probe still
back-propagates. Forward hooks the user registered run as usual.

Weight normalization (`torch.nn.utils.parametrizations.weight_norm` and the older
`torch.nn.utils.weight_norm`) is computed by its defining formula v * g / ||v|| instead of
torch's fused kernel: the same function and the same first derivatives, but torch's double
backward through the fused kernel is wrong (torch 2.13: an HVP 24-41 % off), and the composed
formula's is exact. Costs nothing for a model without weight normalization.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode


class Stateless:
    """Call as `f(x, params)`: `model(x)` with `params` (name -> tensor) swapped in."""

    def __init__(self, model: nn.Module, carry_buffers: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.buffers = {n: b.detach().clone() if dtype is None or not b.is_floating_point()
                        else b.detach().to(dtype) for n, b in model.named_buffers()}
        self.carry_buffers = carry_buffers
        self.weight_norm = uses_weight_norm(model)

    def __call__(self, x: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
                 ) -> torch.Tensor:
        buffers = self.buffers if self.carry_buffers else {
            n: b.clone() for n, b in self.buffers.items()}
        state = {**buffers, **(params or {})}
        with ComposedWeightNorm() if self.weight_norm else contextlib.nullcontext():
            return functional_call(self.model, state, (x,), strict=False)


def leaves(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached aliases of `params` that require grad (no copy; the originals' flags and
    version counters are untouched), to differentiate with respect to."""
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}


def uses_weight_norm(model: nn.Module) -> bool:
    """Whether `model` applies torch's weight normalization (either API) anywhere."""
    return any(isinstance(m, _WeightNorm)
               or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())
               for m in model.modules())


class ComposedWeightNorm(TorchFunctionMode):
    """Inside the block, `torch._weight_norm(v, g, dim)` (what both weight-norm APIs call) is
    computed as v * (g / norm_except_dim(v, 2, dim)): torch's own formula for the cases its
    fused kernel does not take, and twice differentiable exactly."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, dim = (*args, kwargs.get("dim", 0))[:3]
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)
