"""Task options declared once: each task states its options as data; one check reads them.

A task declares `declare_options(TASK, key=Option(...), ...)` next to its code and reads its
options with `read_options(spec)`: `spec.options` laid over the defaults, every unknown key and
every bad value reported together in one ConfigError ("The 'options.points' setting must be an
int in [2, inf); got 1."). `read_options` is also registered as the task's check
(`tasks.register_task_check`), so `normlab run` checks a whole plan before its first run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from normlab.runs.spec import RunSpec
from normlab.runs.tasks import register_task_check
from normlab.utils.config import ConfigError, choice_problem, interval_problem

KINDS = ("int", "float", "bool", "int_list", "str")


@dataclass(frozen=True)
class Option:
    """One task option: its default (a value, or a function of the spec), type and range.

    `kind` is "int", "float" (lower bound `low`, open unless `low_open=False`), "bool",
    "int_list" (a non-empty list of ints >= `low`) or "str" (one of `choices` when given).
    `optional`: None is also allowed.
    """

    default: Any
    kind: str = "int"
    low: float = -math.inf
    low_open: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Option kind must be one of {KINDS}; got {self.kind!r}")

    def default_for(self, spec: RunSpec) -> Any:
        return self.default(spec) if callable(self.default) else self.default

    def problem(self, key: str, value: Any, prefix: str = "options.") -> str | None:
        """The problem sentence for `value` of the setting `prefix + key` (a task's
        `options.key` by default), or None when it is valid."""
        setting = f"{prefix}{key}"
        if value is None and self.optional:
            return None
        if self.kind in ("int", "float"):
            return interval_problem(setting, value, self.low, kind=int if self.kind == "int"
                                    else float, low_open=self.low_open)
        if self.kind == "bool":
            return None if isinstance(value, bool) else \
                f"The {setting!r} setting must be a bool; got {value!r}."
        if self.kind == "int_list":
            ok = isinstance(value, list) and value and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= self.low for v in value)
            return None if ok else (f"The {setting!r} setting must be a non-empty list of ints "
                                    f">= {self.low:g}; got {value!r}.")
        if self.choices and value not in self.choices:
            return choice_problem(setting, value, self.choices)
        return None if isinstance(value, str) else \
            f"The {setting!r} setting must be a str; got {value!r}."


Check = Callable[[RunSpec, dict[str, Any]], list[str]]


@dataclass(frozen=True)
class TaskOptions:
    """The option schema of one task, and its checks that involve more than one setting."""

    task: str
    options: Mapping[str, Option]
    checks: tuple[Check, ...] = ()

    def defaults(self, spec: RunSpec) -> dict[str, Any]:
        return {key: option.default_for(spec) for key, option in self.options.items()}

    def read(self, spec: RunSpec) -> tuple[dict[str, Any], list[str]]:
        """The options of `spec` over the defaults, and every problem with them."""
        options, problems = spec.task_options(self.defaults(spec))
        for key, option in self.options.items():
            problem = option.problem(key, options[key])
            problems += [problem] if problem else []
        for check in self.checks:
            problems += check(spec, options)
        return options, problems


_SCHEMAS: dict[str, TaskOptions] = {}


def declare_options(task: str, *checks: Check, **options: Option) -> TaskOptions:
    """Declare the options of `task` (once); `checks` add problems that span settings."""
    if task in _SCHEMAS:
        raise ValueError(f"The options of task {task!r} are already declared.")
    _SCHEMAS[task] = TaskOptions(task, options, checks)
    register_task_check(task)(read_options)  # so `normlab run` checks them before any run
    return _SCHEMAS[task]


def read_options(spec: RunSpec) -> dict[str, Any]:
    """`spec`'s task options with defaults; one ConfigError listing every problem."""
    options, problems = _SCHEMAS[spec.task].read(spec)
    if problems:
        raise ConfigError(problems)
    return options
