"""The registry of tasks (what a run does) and of their option checks.

`train` is one task; studies register measurement tasks beside it. The built-in tasks register
themselves when their modules are imported: the first lookup imports normlab.train and
normlab.studies by name (`import_submodules`), as the data and norm registries discover their
plugins. The registry itself imports only utils/, so a RunSpec can name its allowed tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from normlab.runs.result import RunResult
from normlab.utils.plugins import import_submodules
from normlab.utils.registry import Registry

Task = Callable[..., RunResult]  # task(spec: RunSpec, context: RunContext) -> RunResult

_TASKS: Registry[Task] = Registry("task")
register_task = _TASKS.register
_CHECKS: Registry[Callable[..., Any]] = Registry("task check")


def register_task_check(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the option check of task `name`: a function of a spec that raises ConfigError.

    `normlab run` calls it for every planned spec before the first run starts, so a bad option
    is refused up front instead of failing every run.
    """
    return _CHECKS.register(name)


def task_check(name: str) -> Callable[..., Any] | None:
    """The declared option check of task `name`, or None."""
    load_builtin_tasks()
    return _CHECKS.get(name) if name in _CHECKS else None


def list_tasks() -> list[str]:
    load_builtin_tasks()
    return _TASKS.names()


def get_task(name: str) -> Task:
    load_builtin_tasks()
    return _TASKS.get(name)


def load_builtin_tasks() -> None:
    """Import the modules whose import registers the built-in tasks."""
    import_submodules("normlab.train")
    import_submodules("normlab.studies")
