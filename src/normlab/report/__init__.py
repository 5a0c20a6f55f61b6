"""Reports: figures (PNG, PDF, CSV), the self-contained report.html, and terminal tables.

`build_report(out_dir)` writes a study folder's report.html. The HTML pieces live in
`normlab.report.html`, terminal output in `normlab.report.terminal`. Imported lazily, so that
studies can import `normlab.studies.figures` without loading the report machinery.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"build_report": "normlab.report.build", "study_sections": "normlab.report.build"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normlab.report' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
