"""Old module paths of normlab 0.1 (before the layers had folders), kept for one release.

`import normlab.spec` (or `from normlab.executor import LocalExecutor`, or unpickling an object
saved under an old path) still works: it warns with a DeprecationWarning naming the new path and
gives the new module's objects. An old module whose contents now live in several modules lists
them all; its names are looked up in that order. Cost: one finder on `sys.meta_path` that answers
only for the names below.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED: dict[str, tuple[str, ...]] = {
    "normlab.config": ("normlab.utils.config",),
    "normlab._registry": ("normlab.utils.registry",),
    "normlab._plugins": ("normlab.utils.plugins",),
    "normlab._atomic": ("normlab.utils.atomic",),
    "normlab._optional": ("normlab.utils.optional",),
    "normlab.spec": ("normlab.runs.spec",),
    "normlab.result": ("normlab.runs.result",),
    "normlab.store": ("normlab.runs.store",),
    "normlab.verify": ("normlab.runs.verify",),
    "normlab.lease": ("normlab.runs.lease", "normlab.execute.settle"),
    "normlab.tasks": ("normlab.runs.tasks",),
    "normlab.preflight": ("normlab.execute.preflight",),
    "normlab.packing": ("normlab.execute.packing", "normlab.train.packable"),
    "normlab.throughput": ("normlab.execute.throughput",),
    "normlab._pool": ("normlab.execute.pool",),
    "normlab.executor": ("normlab.execute.base", "normlab.execute.local"),
    "normlab.executor_args": ("normlab.execute.args",),
    "normlab.executor_slurm": ("normlab.execute.slurm",),
    "normlab.executor_ray": ("normlab.execute.ray",),
    "normlab.run_state": ("normlab.execute.state",),
    "normlab.bench": ("normlab.cli.bench",),
    "normlab.report.figures": ("normlab.studies.figures",),
    "normlab.probes._geometry": ("normlab.nn.geometry",),
}


class _OldPath(ModuleType):
    """A module under an old path: its names are those of the modules it moved to."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved to {', '.join(targets)}.")
        self.__targets = [importlib.import_module(t) for t in targets]

    def __getattr__(self, name: str) -> Any:
        for module in self.__targets:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        targets = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {' and '.join(targets)}; the old path goes away "
                      "in the next release.", DeprecationWarning, stacklevel=2)
        return _OldPath(spec.name, targets)

    def exec_module(self, module: ModuleType) -> None:
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader())


def install() -> None:
    """Answer imports of the old paths (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
