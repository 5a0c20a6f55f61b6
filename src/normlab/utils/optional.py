"""Optional dependencies (the extras in pyproject.toml), imported when an executor or an exporter
needs them."""

from __future__ import annotations

import importlib
from typing import Any

from normlab.utils.config import ConfigError


def import_extra(module: str, extra: str, setting: str = "executor") -> Any:
    """`module`, or a ConfigError saying which extra of normlab installs it (the extra is named
    like the value of `setting` that asked for it: `--executor slurm`, `--to tensorboard`)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"The {setting!r} setting {extra!r} needs {module}: "
                          f"pip install 'normlab[{extra}]'.") from err
