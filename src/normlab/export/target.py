"""The folder an export writes into: checked before anything is written, one folder per run
named by its settings and run id, and a re-export that replaces a run's folder rather than
adding a second one.

An export folder holds the export of one study folder: a marker file (`MARKER`, which names the
study folder and the folder of each exported run), one folder per run and the study's own
folder (`STUDY_FOLDER`). An export goes only into an empty or new folder, or into one that holds
an earlier export of the same study folder; anything else is refused before a file is written.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from normlab.report.terminal import format_value
from normlab.runs.store import CorruptRecordError, read_json
from normlab.utils.atomic import atomic_write_json
from normlab.utils.config import ConfigError

T = TypeVar("T")

MARKER = "normlab-export.json"
STUDY_FOLDER = "study"
_NAME_LIMIT = 150  # characters of settings in a run folder's name (file systems allow 255 bytes)


def target_problems(out_dir: Path, study_dir: Path) -> list[str]:
    """Why an export of `study_dir` cannot be written into `out_dir` ([] when it can)."""
    if out_dir.exists() and not out_dir.is_dir():
        return [f"The export folder {out_dir} is a file, not a folder; choose another OUT."]
    if out_dir.is_dir() and any(out_dir.iterdir()):
        marker = out_dir / MARKER
        if not marker.is_file():
            return [f"The export folder {out_dir} is not empty and holds no normlab export; "
                    "choose a new or empty OUT."]
        try:
            exported = read_json(marker).get("study_dir")
        except (CorruptRecordError, AttributeError, OSError):
            return [f"{marker} is damaged; delete {out_dir} or choose another OUT."]
        if exported != str(study_dir.resolve()):
            return [f"The export folder {out_dir} holds the export of another study folder "
                    f"({exported}); choose another OUT, or delete it."]
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        return [f"The export folder {out_dir} cannot be created: {existing} is not a folder."]
    try:  # probed by writing: catches read-only and immutable folders, for root too
        with tempfile.TemporaryFile(dir=existing, prefix=".normlab-probe-"):
            pass
    except OSError as err:
        return [f"The export folder {out_dir} cannot be written: {existing}: "
                f"{err.strerror or err}. Choose another OUT."]
    return []


def check_target(out_dir: Path, study_dir: Path) -> None:
    """ConfigError when `out_dir` cannot take an export of `study_dir` (target_problems)."""
    problems = target_problems(out_dir, study_dir)
    if problems:
        raise ConfigError(problems)


def run_folder_name(run_id: str, settings: Mapping[str, Any]) -> str:
    """`norm=batch,lr=0.1,seed=0,run=<run_id>`: the run's varying settings (cut to a length a
    file system takes, without path separators) and its run id, which keeps names unique."""
    label = ",".join(f"{name}={format_value(value)}" for name, value in settings.items())
    label = re.sub(r"[/\\\x00]", "_", label)[:_NAME_LIMIT]
    return f"{label},run={run_id}" if label else f"run={run_id}"


def exported_runs(out_dir: Path) -> dict[str, str]:
    """run id -> folder name of the runs an earlier export wrote into `out_dir` ({} if none)."""
    marker = out_dir / MARKER
    return dict(read_json(marker).get("runs", {})) if marker.is_file() else {}


def write_marker(out_dir: Path, study_dir: Path, runs: Mapping[str, str]) -> None:
    """Record in `out_dir` which study folder it exports and the folder of each run."""
    atomic_write_json(out_dir / MARKER, {"study_dir": str(study_dir.resolve()),
                                         "runs": dict(sorted(runs.items()))})


def replace_folder(path: Path, write: Callable[[Path], T], old: Path | None = None) -> T:
    """Write a folder with `write(folder)` under a hidden name beside `path`, then put it in
    place of `path` and of `old` (an earlier name of the same folder): a reader sees the old
    folder or the whole new one, never a half-written one, and never both. Returns what
    `write` returns."""
    hidden = path.parent / f".{path.name[:50]}.{secrets.token_hex(4)}.tmp"
    try:
        written = write(hidden)
        aside = []
        for previous in dict.fromkeys(p for p in (path, old) if p is not None and p.exists()):
            moved = previous.parent / f".{previous.name[:50]}.{secrets.token_hex(4)}.old"
            os.replace(previous, moved)
            aside.append(moved)
        os.replace(hidden, path)
        for moved in aside:
            shutil.rmtree(moved)
        return written
    finally:
        if hidden.exists():
            shutil.rmtree(hidden)
