"""`verify_store`: every damaged file of a study folder, named, before anything reads it.

A finished run (one with a result.json) is sound when
- its spec.json parses, is a valid RunSpec, and hashes to the folder's name;
- its result.json parses and every field has the type RunResult gives it;
- its metrics.jsonl and records.jsonl parse, one JSON object a line (metric rows with an integer
  `step`, records with a `probe` name), and have the size and line count that result.json
  recorded when the run finished: a deleted or truncated file is caught, whether or not it was
  cut at a line end. (Results written before normlab recorded sizes are checked for parsing only.)
- its steps are logged once and in order: in metrics.jsonl the step column never decreases and
  no step appears twice in rows of the same kind (per-step rows, "eval" rows); in records.jsonl
  each probe's step column never decreases. A run restarted without cutting its log back (rows
  of steps 0, 1, ... appended after its old ones) or a step written twice breaks these.

A folder without result.json is an unfinished run, not damage: `normlab run` redoes it.
study.json, when present, must name a study, a scale, data, overrides and run ids of the right
types. Cost: one read of every file of every finished run (what a report reads anyway).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.runs.result import DATA_FILES, FILES_KEY, field_type_problems, result_problems
from normlab.runs.spec import RunSpec
from normlab.runs.store import CorruptRecordError, RunStore, read_json, read_jsonl
from normlab.utils.config import ConfigError


@dataclass(frozen=True)
class Damage:
    """One damaged file: the run it belongs to (None for study.json), the file and the problem."""

    run_id: str | None
    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class DamagedStoreError(CorruptRecordError):
    """A study folder with damaged files; `damages` names each one."""

    def __init__(self, damages: list[Damage], advice: str = "") -> None:
        self.damages = damages
        self.advice = advice
        super().__init__("\n".join([*map(str, damages), *([advice] if advice else [])]))


def verify_store(out_dir: str | Path) -> list[Damage]:
    """Every damaged file under `out_dir` (study.json and each run folder); [] when all is sound."""
    out_dir = Path(out_dir)
    damages = study_file_damage(out_dir)
    for run_dir in RunStore(out_dir).run_dirs():
        damages += run_damage(run_dir)
    return damages


def damaged_runs(damages: list[Damage]) -> list[str]:
    """The run ids named in `damages`, once each, in order."""
    return list(dict.fromkeys(d.run_id for d in damages if d.run_id is not None))


def study_file_damage(out_dir: Path) -> list[Damage]:
    path = out_dir / "study.json"
    if not path.exists():
        return []
    try:
        data = read_json(path)
    except CorruptRecordError as err:
        return [Damage(None, path, _problem(err, path))]
    expected = {"study": (str,), "scale": (str,), "data": (str, type(None)),
                "overrides": (dict,), "run_ids": (list,)}
    if not isinstance(data, dict):
        return [Damage(None, path, f"must hold a JSON object; got {type(data).__name__}.")]
    problems = field_type_problems(data, expected)
    if isinstance(data.get("run_ids"), list) and not all(isinstance(r, str)
                                                          for r in data["run_ids"]):
        problems.append("'run_ids' must be a list of run ids (strings).")
    return [Damage(None, path, p) for p in problems]


def run_damage(run_dir: Path) -> list[Damage]:
    """The damage of one run folder; none for an unfinished run (no result.json)."""
    run_id, result_path = run_dir.name, run_dir / "result.json"
    if not result_path.exists():
        return []
    damages = [Damage(run_id, run_dir / "spec.json", p) for p in _spec_problems(run_dir)]
    try:
        data = read_json(result_path)
    except CorruptRecordError as err:
        return [*damages, Damage(run_id, result_path, _problem(err, result_path))]
    problems = result_problems(data)
    damages += [Damage(run_id, result_path, p) for p in problems]
    recorded = data.get(FILES_KEY) if isinstance(data, dict) else None
    for name in DATA_FILES:
        expected = recorded.get(name) if isinstance(recorded, dict) else None
        damages += [Damage(run_id, run_dir / name, p)
                    for p in _data_file_problems(run_dir / name, expected, recorded is None)]
    return damages


def _spec_problems(run_dir: Path) -> list[str]:
    path = run_dir / "spec.json"
    if not path.exists():
        return ["missing: a finished run must keep its spec."]
    try:
        spec = RunSpec.from_dict(read_json(path))
    except CorruptRecordError as err:
        return [_problem(err, path)]
    except ConfigError as err:
        return [f"not a valid run spec: {' '.join(err.problems)}"]
    except (TypeError, AttributeError, ValueError) as err:
        return [f"not a run spec ({err})."]
    if spec.run_id != run_dir.name:
        return [f"holds the spec of run {spec.run_id}, not of {run_dir.name} (the folder is "
                "named by its spec's hash)."]
    return []


def _data_file_problems(path: Path, expected: Mapping[str, Any] | None,
                        legacy: bool) -> list[str]:
    if not path.exists():
        return [] if legacy or expected is None else [
            f"missing: the run finished with {expected.get('rows')} lines in it."]
    if not legacy and expected is None:
        return ["not recorded in result.json: the run finished without this file."]
    try:
        rows = read_jsonl(path)
    except CorruptRecordError as err:
        return [_problem(err, path)]
    problems = [f"row {i}: {p}" for i, row in enumerate(rows, 1)
                if (p := _row_problem(path.name, row))]
    problems += step_order_problems(path.name, rows)
    if expected is not None:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            lines = sum(1 for _ in handle)
        if (size, lines) != (expected.get("bytes"), expected.get("rows")):
            problems.append(f"{size} bytes in {lines} lines, but the run finished with "
                            f"{expected.get('bytes')} bytes in {expected.get('rows')} lines "
                            "(truncated or changed since).")
    return problems[:3]


def _row_problem(name: str, row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"must be a JSON object; got {type(row).__name__}."
    if name == "metrics.jsonl":
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return f"a metric row must have an integer 'step'; got {step!r}."
    elif not isinstance(row.get("probe"), str):
        return f"a record must have a 'probe' name; got {row.get('probe')!r}."
    return None


def step_order_problems(name: str, rows: list[Any]) -> list[str]:
    """Steps logged twice or going back in a run's metrics.jsonl (one row per step and kind;
    the step column never decreases) or records.jsonl (each probe's step column never
    decreases); rows without an integer step are left to `_row_problem`."""
    problems = []
    last: dict[Any, int] = {}  # the last step seen per kind of metric row, or per probe
    previous: int | None = None
    for number, row in enumerate(rows, 1):
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if name == "metrics.jsonl":
            kind = row.get("kind")
            label = f"the {kind!r} row of step" if kind is not None else "step"
            if kind in last and step <= last[kind]:
                problems.append(f"row {number}: {label} {step} comes after {label} "
                                f"{last[kind]}: a step logged twice or out of order (a run "
                                "restarted without cutting its log?).")
            elif previous is not None and step < previous:
                problems.append(f"row {number}: step {step} comes after step {previous}: the "
                                "steps must never decrease.")
            previous = max(step, previous if previous is not None else step)
        else:
            kind = row.get("probe")
            if kind in last and step < last[kind]:
                problems.append(f"row {number}: probe {kind!r} at step {step} comes after its "
                                f"step {last[kind]}: steps logged twice or out of order (a run "
                                "restarted without cutting its log?).")
        last[kind] = max(step, last.get(kind, step))
    return problems


def _problem(err: CorruptRecordError, path: Path) -> str:
    """The message of a CorruptRecordError without the file name it starts with."""
    text = str(err)
    return text[len(str(path)):].lstrip(":, ") if text.startswith(str(path)) else text
