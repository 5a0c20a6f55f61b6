"""What every probe returns: tidy records (`.records()`, a list of dicts) and `.to_frame()`.

`Records` is a list of dicts that is also callable (`r.records()` and `r` read the same rows),
so results that used to be plain lists or had a `records` list attribute keep working.
`finite` is False when a number was computed from non-finite values (NaN/inf input, loss or
gradient); records then carry `finite=False` too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class RecordsMixin:
    """`.to_frame()` (a pandas DataFrame of `.records()`) for result objects."""

    def records(self) -> list[dict[str, Any]]:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(list(self.records()))


class Records(list, RecordsMixin):
    """A list of tidy record dicts; `records()` returns them as a plain list."""

    def records(self) -> list[dict[str, Any]]:
        return list(self)

    def __call__(self) -> list[dict[str, Any]]:  # `result.records()` where `records` is a field
        return list(self)

    @property
    def finite(self) -> bool:
        return all(r.get("finite", True) for r in self)


def all_finite(values: Iterable[Any]) -> bool:
    """Whether every number (float or tensor) in `values` is finite."""
    import torch

    for v in values:
        if isinstance(v, torch.Tensor):
            if v.numel() and not bool(torch.isfinite(v).all()):
                return False
        elif isinstance(v, float) and not math.isfinite(v):
            return False
    return True


def rounding_slack(dtype) -> float:
    """The relative error a self-check allows at `dtype`: the square root of its machine
    epsilon (3.5e-4 in float32, 1.5e-8 in float64): rounding passes, a wrong number does not."""
    import torch

    return torch.finfo(dtype).eps ** 0.5 if dtype.is_floating_point else 0.0


def flagged(rows: Iterable[dict[str, Any]], finite: bool, **extra: Any) -> Records:
    """`rows` as `Records`, each with `extra` keys and, where not finite, `finite=False`."""
    out = Records()
    for row in rows:
        row = {**row, **extra}
        if not finite:
            row["finite"] = False
        out.append(row)
    return out
