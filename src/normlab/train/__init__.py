"""Training: `train(spec, callbacks=())` runs SGD on a RunSpec and returns a RunResult.

    from normlab import RunSpec
    from normlab.train import train
    result = train(RunSpec(data="digits", depth=8, width=8, epochs=2, lr=0.05))
    result.status, result.final["test_acc"]

Probes run inside training as callbacks (`register_callback`, `scheduled`). See
docs/training.md for the conventions (steps, schedules, divergence, evaluation mode).
"""

from normlab.train.callbacks import (
    Callback,
    Stateful,
    TrainState,
    list_callbacks,
    register_callback,
    scheduled,
    with_state,
)
from normlab.train.divergence import Divergence, check_divergence
from normlab.train.loop import train
from normlab.train.schedules import SCHEDULES, lr_at

__all__ = [
    "SCHEDULES",
    "Callback",
    "Divergence",
    "Stateful",
    "TrainState",
    "check_divergence",
    "list_callbacks",
    "lr_at",
    "register_callback",
    "scheduled",
    "train",
    "with_state",
]
