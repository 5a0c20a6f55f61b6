"""Import every module of a package, so that the registrations they hold take effect."""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package: str) -> None:
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
