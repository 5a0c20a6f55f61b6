"""Callbacks: how probes run on a schedule inside `train`.

A callback is any callable taking a `TrainState`. `train` calls each callback once before the
first optimizer step (state.step == 0, on the first mini-batch) and after every optimizer step.
A callback decides itself whether to act (`state.step % every == 0`).

Probes named in `RunSpec.probes` (e.g. {"name": "radial", "every": 50}) are built through the
callback registry: `@register_callback("radial")` on a factory `factory(**options) -> Callback`;
"every" is handled by `train` (see `scheduled`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normlab._plugins import import_submodules
from normlab._registry import Registry
from normlab.spec import RunSpec
from normlab.tasks import RunContext


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

    def run_on_schedule(state: TrainState) -> None:
        if state.step % every == 0:
            callback(state)

    return run_on_schedule


def _load_builtin_callbacks() -> None:
    import_submodules("normlab.probes")  # probe modules register their callbacks on import
