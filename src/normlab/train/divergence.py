"""Divergence: a mini-batch loss that is non-finite or above a threshold ends the run.

The paper's definition (threshold 1e3 on the mini-batch loss, `RunSpec.diverge_loss`). A diverged
run is a result, recorded with status "diverged", never an exception.

JSON convention (strict JSON has no NaN or infinity): `RunResult.diverged_loss` holds the loss
when it is finite and None when it is not; `RunResult.final["diverged_reason"]` then says which:
"threshold" (finite, above `diverge_loss`), "inf", "-inf" or "nan". Metric rows go through
`json_safe`, which writes non-finite floats as None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Divergence:
    """Why and where a run diverged: the optimizer step (0-based) whose mini-batch loss failed."""

    step: int
    loss: float
    threshold: float

    @property
    def reason(self) -> str:
        """'threshold', 'inf', '-inf' or 'nan'."""
        if math.isfinite(self.loss):
            return "threshold"
        return "nan" if math.isnan(self.loss) else ("inf" if self.loss > 0 else "-inf")

    @property
    def stored_loss(self) -> float | None:
        """The loss as stored in JSON: the value when finite, else None (see `reason`)."""
        return self.loss if math.isfinite(self.loss) else None


def check_divergence(loss: float, step: int, threshold: float) -> Divergence | None:
    """A `Divergence` if `loss` is non-finite or greater than `threshold`, else None."""
    if math.isfinite(loss) and loss <= threshold:
        return None
    return Divergence(step=step, loss=loss, threshold=threshold)


def json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with non-finite float values replaced by None (strict JSON has no NaN/inf)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}
