"""Validation at the boundary: every bad setting fails with its name, its value and what is allowed.

`ConfigError` carries one message per problem, so a study file with three mistakes reports all
three at once. Checks here are for user input; `assert` is kept for internal invariants.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


class ConfigError(ValueError):
    """One or more invalid settings. `problems` lists one sentence per bad setting."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    @classmethod
    def choice(cls, setting: str, value: Any, allowed: Iterable[Any]) -> ConfigError:
        return cls(choice_problem(setting, value, allowed))


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters (a 5000-digit number stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} characters)"


def choice_problem(setting: str, value: Any, allowed: Iterable[Any]) -> str:
    options = ", ".join(repr(a) for a in allowed)
    return f"The {setting!r} setting must be one of {options}; got {shown(value)}."


def check_choice(setting: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError.choice(setting, value, allowed)


def interval_problem(
    setting: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    kind: type = float,
    low_open: bool = True,
    high_open: bool = True,
) -> str | None:
    """The problem sentence if `value` is not a `kind` in the interval, else None.

    Ints are accepted where floats are asked for; bools are never numbers here.
    """
    kinds = (int, float) if kind is float else (kind,)
    ok_type = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok_type and not (isinstance(value, float) and math.isnan(value))
    if ok:
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        ok = not (below or above)
    if ok:
        return None
    left = "(" if low_open or math.isinf(low) else "["
    right = ")" if high_open or math.isinf(high) else "]"
    return (
        f"The {setting!r} setting must be a{'n' if kind is int else ''} {kind.__name__} "
        f"in {left}{_bound(low)}, {_bound(high)}{right}; got {shown(value)}."
    )


def _bound(value: float) -> str:
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_interval(setting: str, value: Any, low: float = -math.inf, high: float = math.inf,
                   **kwargs: Any) -> None:
    problem = interval_problem(setting, value, low, high, **kwargs)
    if problem:
        raise ConfigError(problem)
