"""The run store: one folder per run, named by the spec's hash, written so a crash loses nothing.

Layout of `<out>/runs/<run_id>/`:

    spec.json       the RunSpec (written first, atomically)
    metrics.jsonl   per-step and per-epoch metric rows, appended as the run goes
    records.jsonl   tidy probe records (one JSON object a line, each with a "probe" key)
    result.json     the RunResult, written atomically and last: its presence means "done";
                    it also records the size, line count and sha256 digest of the two
                    JSON-lines files ("files"), so that a file deleted, truncated or edited
                    later is detected
    checkpoint.pt   the state of an unfinished run, written atomically (train/checkpoint.py)

`<out>/study.json` holds the plan (`study_record`: study, scale, data, overrides, run ids) and
the sha256 digest of those fields, so that a hand edit of the plan is detected.

A run folder without a valid result.json is unfinished; starting the run again resumes it from
its checkpoint, or else replaces it by a fresh folder. Writers claim a run first (lease.py).
`normlab.runs.verify` checks a folder; damaged runs are moved to `<out>/damaged/` by `set_aside`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from normlab.runs.result import DATA_FILES, FILES_KEY, RunResult, result_problems
from normlab.runs.spec import RunSpec
from normlab.utils.atomic import _jsonable, atomic_replace_dir, atomic_write_json

DONE_STATUSES = ("completed", "diverged")
CHECKPOINT_FILE = "checkpoint.pt"
STUDY_FILE = "study.json"
STUDY_DIGEST_KEY = "sha256"  # study.json's digest of its other fields (absent in older folders)


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


def files_record(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The fingerprint (`file_fingerprint`) of each JSON-lines file of a run, for its
    result.json."""
    return {name: file_fingerprint(run_dir / name) for name in DATA_FILES
            if (run_dir / name).exists()}


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size in bytes, line count (a last line without a newline counts) and sha256 hex digest
    of a file, from one streamed read."""
    digest, rows = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for line in handle:
            digest.update(line)
            rows += 1
        size = handle.tell()
    return {"bytes": size, "rows": rows, "sha256": digest.hexdigest()}


def study_record(study: str, scale: str, data: str | None, overrides: Mapping[str, Any],
                 run_ids: list[str]) -> dict[str, Any]:
    """The content of study.json: the plan, and its sha256 digest (`study_digest`)."""
    record = json.loads(json.dumps({"study": study, "scale": scale, "data": data,
                                    "overrides": dict(overrides), "run_ids": list(run_ids)},
                                   default=_jsonable))
    return {**record, STUDY_DIGEST_KEY: study_digest(record)}


def study_digest(record: Mapping[str, Any]) -> str:
    """sha256 (hex) of study.json's fields but the digest, as canonical JSON (sorted keys)."""
    text = json.dumps({k: v for k, v in record.items() if k != STUDY_DIGEST_KEY}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_result(path: Path) -> RunResult:
    """The RunResult in `path`; CorruptRecordError naming the file (and each field of the wrong
    type) when it is not one."""
    data = read_json(path)
    problems = result_problems(data)
    if problems:
        raise CorruptRecordError(f"{path}: not a run result: {' '.join(problems)}")
    return RunResult.from_dict({k: v for k, v in data.items() if k != FILES_KEY})
