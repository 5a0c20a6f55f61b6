"""Atomic file writes: write a temporary file beside the target, fsync, then rename over it.

The file gets the mode a plain `open` would give it (0666 less the process umask), not the 0600
of `tempfile.mkstemp`, so a report on a shared machine can be read by the people it is for.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one.
    A failed write (a full disk, a read-only folder) raises OSError naming `path` and the
    reason, and leaves no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:  # name the file the user asked for, not the temporary one
        _remove(tmp)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    """JSON fallback for numpy scalars/arrays and torch scalars."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def atomic_replace_dir(path: str | os.PathLike, files: dict[str, Any]) -> None:
    """Replace the folder `path` by a new one holding `files` (name -> JSON data) at once.

    The new folder is built beside `path` under a hidden name and renamed into place; an old
    folder is first renamed aside and then deleted, so `path` is never seen half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent.parent / ".staging"
    staging.mkdir(exist_ok=True)
    token = secrets.token_hex(6)
    new, old = staging / f"{path.name}.{token}.new", staging / f"{path.name}.{token}.old"
    new.mkdir()
    for name, data in files.items():
        atomic_write_json(new / name, data)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)
