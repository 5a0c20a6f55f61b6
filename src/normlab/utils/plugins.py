"""Import every module of a package, so that the registrations they hold take effect."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import types
from collections.abc import Collection


def import_submodules(package: str) -> None:
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def keep_functions_over_submodules(package: str, names: Collection[str]) -> None:
    """Keep `package.NAME` the function NAME when the submodule `package.NAME` is imported.

    Python sets a package's attribute to a submodule when that submodule is imported, which would
    shadow a public function of the same name (`normlab.train`, `normlab.probes.step_loss`).
    """

    class _Package(types.ModuleType):
        def __setattr__(self, name: str, value: object) -> None:
            if name in names and isinstance(value, types.ModuleType) and hasattr(value, name):
                value = getattr(value, name)
            super().__setattr__(name, value)

    sys.modules[package].__class__ = _Package
