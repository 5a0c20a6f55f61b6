"""Optional dependencies (the extras in pyproject.toml), imported when an executor needs them."""

from __future__ import annotations

import importlib
from typing import Any

from normlab.utils.config import ConfigError


def import_extra(module: str, executor: str) -> Any:
    """`module`, or a ConfigError saying which extra of normlab installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"The 'executor' setting {executor!r} needs {module}: "
                          f"pip install 'normlab[{executor}]'.") from err
