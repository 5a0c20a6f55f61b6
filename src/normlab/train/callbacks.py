"""Callbacks: how probes run on a schedule inside `train`.

A callback is any callable taking a `TrainState`. `train` calls each callback once before the
first optimizer step (state.step == 0, on the first mini-batch) and after every optimizer step.
A callback decides itself whether to act (`state.step % every == 0`).

Probes named in `RunSpec.probes` (e.g. {"name": "radial", "every": 50}) are built through the
callback registry: `@register_callback("radial")` on a factory `factory(**options) -> Callback`;
"every" is handled by `train` (see `scheduled`).

State across a resume: a callback that keeps anything between calls (a batch it measures on,
a running sum) exposes it with `state_dict()` and `load_state_dict(state)`, as torch modules
do, and a checkpoint saves it beside the model (train/checkpoint.py). A closure-style factory
keeps its state in a dict and returns `with_state(callback, memory)`. Values must be what
`torch.load(weights_only=True)` reads back: tensors, numbers, strings, lists, tuples, dicts.
A callback without `state_dict` is taken to keep no state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext
from normlab.utils.plugins import import_submodules
from normlab.utils.registry import Registry


@dataclass
class TrainState:
    """What a callback sees. `x`, `y` are the current mini-batch (on the run's device);
    `loss` is that batch's loss before the step (None at step 0); `lr` the current learning rate.
    """

    spec: RunSpec
    step: int
    epoch: float
    total_steps: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    loss: float | None
    lr: float
    device: torch.device
    context: RunContext
    train_data: Any = None
    test_data: Any = None


Callback = Callable[[TrainState], None]


@runtime_checkable
class Stateful(Protocol):
    """A callback whose state a checkpoint must save (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _WithState:
    """`callback` with its `memory` dict exposed as its state: what `with_state` returns."""

    def __init__(self, callback: Callback, memory: dict[str, Any]) -> None:
        self.callback, self.memory = callback, memory

    def __call__(self, state: TrainState) -> None:
        self.callback(state)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.memory)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.clear()  # in place: the closure holds this very dict
        self.memory.update(state)


def with_state(callback: Callback, memory: dict[str, Any]) -> Callback:
    """`callback`, whose state between calls lives in `memory` (a dict it reads and writes),
    made checkpointable: a resumed run restores `memory` before the next call."""
    return _WithState(callback, memory)


def callback_states(callbacks: Sequence[Callback]) -> list[dict[str, Any] | None]:
    """The state of each callback, in order (None for one that keeps none)."""
    return [c.state_dict() if isinstance(c, Stateful) else None for c in callbacks]


def load_callback_states(callbacks: Sequence[Callback],
                         states: Sequence[dict[str, Any] | None]) -> None:
    """Restore `callback_states(callbacks)` as saved; ValueError when the callbacks are not
    the ones that were saved (another number, or state for one that keeps none)."""
    if len(states) != len(callbacks):
        raise ValueError(f"The checkpoint holds the state of {len(states)} callbacks; this "
                         f"run has {len(callbacks)}: resume it with the same callbacks.")
    for index, (callback, state) in enumerate(zip(callbacks, states, strict=True)):
        if isinstance(callback, Stateful) != (state is not None):
            raise ValueError(f"Callback {index} ({callback!r}) does not match the checkpoint "
                             "(one keeps state, the other does not): resume it with the same "
                             "callbacks.")
        if state is not None:
            callback.load_state_dict(state)


_CALLBACKS: Registry[Callable[..., Callback]] = Registry("probe")
register_callback = _CALLBACKS.register


def list_callbacks() -> list[str]:
    _load_builtin_callbacks()
    return _CALLBACKS.names()


def scheduled(name: str, every: int = 1, **options: Any) -> Callback:
    """The registered probe `name` built with `options`, called every `every` steps (and step 0)."""
    _load_builtin_callbacks()
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"The 'every' setting of probe {name!r} must be an int >= 1; "
                         f"got {every!r}.")
    callback = _CALLBACKS.get(name)(**options)
    if isinstance(callback, Stateful):
        return _StatefulScheduled(callback, every)
    return _Scheduled(callback, every)


class _Scheduled:
    """`callback` called at the steps divisible by `every`."""

    def __init__(self, callback: Callback, every: int) -> None:
        self.callback, self.every = callback, every

    def __call__(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            self.callback(state)


class _StatefulScheduled(_Scheduled):
    """A scheduled stateful callback: its state is the callback's."""

    callback: Stateful

    def state_dict(self) -> dict[str, Any]:
        return self.callback.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.callback.load_state_dict(state)


def _load_builtin_callbacks() -> None:
    import_submodules("normlab.probes")  # probe modules register their callbacks on import
