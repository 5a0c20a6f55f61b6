"""The run store: one folder per run, named by the spec's hash, written so a crash loses nothing.

Layout of `<out>/runs/<run_id>/`:

    spec.json       the RunSpec (written first, atomically)
    metrics.jsonl   per-step and per-epoch metric rows, appended as the run goes
    records.jsonl   tidy probe records (one JSON object a line, each with a "probe" key)
    result.json     the RunResult, written atomically and last: its presence means "done";
                    it also records the size and line count of the two JSON-lines files
                    ("files"), so that a file deleted or truncated later is detected
    checkpoint.pt   the state of an unfinished run, written atomically (train/checkpoint.py)

A run folder without a valid result.json is unfinished; starting the run again resumes it from
its checkpoint, or else replaces it by a fresh folder. Writers claim a run first (lease.py).
`normlab.runs.verify` checks a folder; damaged runs are moved to `<out>/damaged/` by `set_aside`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from normlab.runs.result import DATA_FILES, FILES_KEY, RunResult, result_problems
from normlab.runs.spec import RunSpec
from normlab.utils.atomic import _jsonable, atomic_replace_dir, atomic_write_json

DONE_STATUSES = ("completed", "diverged")
CHECKPOINT_FILE = "checkpoint.pt"


class CorruptRecordError(RuntimeError):
    """A stored file that cannot be parsed; the message names the file (and line)."""


class RunStore:
    """The folder of one study's runs."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"

    def run_dir(self, spec: RunSpec) -> Path:
        return self.runs_dir / spec.run_id

    def is_done(self, spec: RunSpec) -> bool:
        """True when the run has a readable result.json with a final status.

        A failed run is retried. A corrupt result.json raises CorruptRecordError naming it.
        """
        path = self.run_dir(spec) / "result.json"
        if not path.exists():
            return False
        return read_result(path).status in DONE_STATUSES

    def begin(self, spec: RunSpec) -> Path:
        """Start (or restart) a run: keep a checkpointed attempt, else a fresh folder."""
        run_dir = self.run_dir(spec)
        if (run_dir / CHECKPOINT_FILE).exists() and \
                read_json(run_dir / "spec.json") == spec.to_dict():
            return run_dir
        atomic_replace_dir(run_dir, {"spec.json": spec.to_dict()})
        return run_dir

    def finish(self, spec: RunSpec, result: RunResult) -> None:
        run_dir = self.run_dir(spec)
        atomic_write_json(run_dir / "result.json",
                          {**result.to_dict(), FILES_KEY: files_record(run_dir)})
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)

    def run_dirs(self) -> Iterator[Path]:
        if self.runs_dir.is_dir():
            yield from sorted(p for p in self.runs_dir.iterdir() if p.is_dir())

    def set_aside(self, run_id: str) -> Path:
        """Move a damaged run's folder to `<out>/damaged/` (kept for inspection; the run is then
        redone like any missing run). Returns where it went."""
        target = self.root / "damaged" / run_id
        number = 1
        while target.exists():
            number += 1
            target = self.root / "damaged" / f"{run_id}-{number}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.runs_dir / run_id), target)
        return target


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to a JSON-lines file and flush (a crash loses at most a partial last line)."""
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=_jsonable) + "\n")
        handle.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSON-lines file; a malformed line raises CorruptRecordError naming it."""
    if not path.exists():
        return []
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                rows.append(json.loads(raw.decode("utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                reason = getattr(err, "msg", None) or type(err).__name__
                raise CorruptRecordError(f"{path}, line {number}: not valid JSON ({reason}).") \
                    from err
    return rows


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CorruptRecordError(f"{path}: not valid JSON ({err}).") from err


def files_record(run_dir: Path) -> dict[str, dict[str, int]]:
    """Size in bytes and line count of each JSON-lines file of a run, for its result.json."""
    out = {}
    for name in DATA_FILES:
        path = run_dir / name
        if path.exists():
            with open(path, "rb") as handle:
                out[name] = {"bytes": path.stat().st_size, "rows": sum(1 for _ in handle)}
    return out


def read_result(path: Path) -> RunResult:
    """The RunResult in `path`; CorruptRecordError naming the file (and each field of the wrong
    type) when it is not one."""
    data = read_json(path)
    problems = result_problems(data)
    if problems:
        raise CorruptRecordError(f"{path}: not a run result: {' '.join(problems)}")
    return RunResult.from_dict({k: v for k, v in data.items() if k != FILES_KEY})
