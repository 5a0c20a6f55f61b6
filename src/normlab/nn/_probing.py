"""Running a model to learn how it behaves, without changing it, and remembering what was learned.

`run_privately` calls a module on private copies of its buffers (BN running statistics are
updated, if at all, on the copies) with the global RNG restored afterwards, so a behaviour
probe neither moves the model nor the random stream of the measurement that follows.
`structure_key` is a hashable description of a module tree (types, plain configuration,
parameter and buffer shapes, hooks, train/eval flags): what a behaviour probe learned about a
model holds for every model with the same key and input shape, and `LearnedCache` keeps it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules import module as module_globals

# Attributes that change during training without changing how a module treats the batch:
# normlab's BatchRenorm schedule position (set every step; it moves rmax/dmax, never coupling).
_MOVING_ATTRIBUTES = frozenset({"training_fraction"})


def run_privately(module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None,
                  params: Mapping[str, torch.Tensor] | None = None, seed: int | None = None
                  ) -> Any:
    """`module(*args, **kwargs)` on private copies of its buffers, with `params` (name ->
    tensor) swapped in; the global RNG is restored afterwards (and seeded with `seed` for the
    call when given)."""
    state = {n: b.detach().clone() for n, b in module.named_buffers()}
    state.update(params or {})
    devices = sorted({a.device.index or 0 for a in args
                      if isinstance(a, torch.Tensor) and a.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        return functional_call(module, state, tuple(args), dict(kwargs or {}), strict=False)


def structure_key(module: nn.Module, flags: bool = True) -> tuple:
    """A hashable description of `module` and its submodules: what decides how it treats a
    batch, except the values of its tensors (and the attributes in `_MOVING_ATTRIBUTES`);
    with `flags=False`, except their train/eval flags too."""
    hooks = tuple(id(h) for d in (module_globals._global_forward_hooks,
                                  module_globals._global_forward_pre_hooks,
                                  module_globals._global_backward_hooks) for h in d.values())
    return (hooks, *((name, _module_key(m, flags)) for name, m in module.named_modules()))


def tensor_key(value: Any) -> Any:
    """Shape, dtype and device type of a tensor (recursively in tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(tensor_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), tensor_key(v)) for k, v in value.items()))
    return _plain(value)


def _module_key(m: nn.Module, flags: bool) -> tuple:
    # attributes in the order they were set (a module that sets them in another order is keyed
    # apart: a second behaviour probe, never a wrong answer)
    config = tuple((k, _plain(v)) for k, v in vars(m).items()
                   if k[0] != "_" and k != "training" and k not in _MOVING_ATTRIBUTES)
    params = tuple((n, None if p is None else (tuple(p.shape), p.dtype))
                   for n, p in m._parameters.items())
    buffers = tuple((n, None if b is None else (tuple(b.shape), b.dtype))
                    for n, b in m._buffers.items())
    hooks = tuple(id(h) for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                  m._backward_pre_hooks) for h in d.values())
    return (type(m), m.training if flags else None, config, params, buffers, hooks)


_SIMPLE = frozenset({bool, int, float, str, type(None), torch.dtype, torch.device})


def _plain(value: Any) -> Any:
    if type(value) in _SIMPLE:
        return value
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    return (type(value).__qualname__, id(value))


class LearnedCache:
    """A small least-recently-used map from keys to what a behaviour probe learned."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._entries: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def put(self, key: Any, value: Any) -> Any:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value
