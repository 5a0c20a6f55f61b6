"""`verify_store`: every damaged file of a study folder, named, before anything reads it.

A finished run (one with a result.json) is sound when
- its spec.json parses, is a valid RunSpec, and hashes to the folder's name;
- its result.json parses, every field has the type RunResult gives it, and every value is one
  a run can end with (`normlab.runs.result.value_problems`: no negative steps, losses or wall
  time, accuracies in [0, 1], a diverged_step in [0, steps], a status its fields agree with);
- its metrics.jsonl and records.jsonl parse, one JSON object a line (metric rows with an integer
  `step`, records with a `probe` name), and have the size, line count and sha256 digest that
  result.json recorded when the run finished: a deleted or truncated file is caught, whether or
  not it was cut at a line end, and so is one changed digit. (Results written before normlab
  recorded digests are checked for size and line count only; those written before it recorded
  sizes, for parsing only.)
- its steps are logged once and in order: in metrics.jsonl the step column never decreases and
  no step appears twice in rows of the same kind (per-step rows, "eval" rows); in records.jsonl
  each probe's step column never decreases. A run restarted without cutting its log back (rows
  of steps 0, 1, ... appended after its old ones) or a step written twice breaks these.

A folder without result.json is an unfinished run, not damage: `normlab run` redoes it.

study.json, when present, must name a study, a scale, data, overrides and run ids of the right
types, and match the digest normlab wrote it with: a hand edit (another study's name over
these runs, a run id added or removed) is damage. That is the cheapest sound check of the
study's identity: the runs do not record their study, and planning the study again to compare
run ids would import the studies (torch) into verify. Each listed run that finished holds a
spec that hashes to its id (above). A study.json copied whole from another folder passes this
check; its runs are then absent here, and the report shows none of this folder's runs.
A study.json that lists runs while `runs/` is missing or holds no run folder is damage when
runs have started in the folder (its `leases/` or report.html exists): the run folders were
deleted or moved. A study whose runs have not started yet is no damage.
A folder with `runs/` and a report.html but no study.json is a study that lost its plan:
damage, so that verify, show and report all refuse it alike. Without a report.html it is a bare
run store (`execute_run` writes one): its runs are checked, and only report refuses it, since
it needs to know the study.

Cost: one streamed read of every file of every finished run (what a report reads anyway) and
one sha256 of each JSON-lines file (about 1 GB/s on one core), plus one of study.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.runs.lease import LEASE_DIR
from normlab.runs.result import DATA_FILES, FILES_KEY, field_type_problems, result_problems
from normlab.runs.spec import RunSpec
from normlab.runs.store import (
    STUDY_DIGEST_KEY,
    STUDY_FILE,
    CorruptRecordError,
    RunStore,
    file_fingerprint,
    read_json,
    read_jsonl,
    study_digest,
)
from normlab.utils.config import ConfigError

REPORT_FILE = "report.html"  # written by normlab.report once a study's runs have settled


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
    """Every damaged file under `out_dir` (study.json, runs/ and each run folder); [] when all
    is sound."""
    out_dir = Path(out_dir)
    damages = study_file_damage(out_dir)
    store = RunStore(out_dir)
    run_dirs = list(store.run_dirs())
    for run_dir in run_dirs:
        damages += run_damage(run_dir)
    if not run_dirs and not damages:
        damages += lost_runs_damage(out_dir, store.runs_dir)
    return damages


def damaged_runs(damages: list[Damage]) -> list[str]:
    """The run ids named in `damages`, once each, in order."""
    return list(dict.fromkeys(d.run_id for d in damages if d.run_id is not None))


def study_file_damage(out_dir: Path) -> list[Damage]:
    path = out_dir / STUDY_FILE
    if not path.exists():
        if (out_dir / REPORT_FILE).exists() and (out_dir / "runs").is_dir():
            return [Damage(None, path, f"missing, but {REPORT_FILE} shows a study was run here: "
                                       "without it nothing says which study its runs belong "
                                       "to (deleted or moved?).")]
        return []
    try:
        data = read_json(path)
    except CorruptRecordError as err:
        return [Damage(None, path, _problem(err, path))]
    expected = {"study": (str,), "scale": (str,), "data": (str, type(None)),
                "overrides": (dict,), "run_ids": (list,), STUDY_DIGEST_KEY: (str,)}
    if not isinstance(data, dict):
        return [Damage(None, path, f"must hold a JSON object; got {type(data).__name__}.")]
    problems = field_type_problems(data, expected, optional={STUDY_DIGEST_KEY})
    if isinstance(data.get("run_ids"), list) and not all(isinstance(r, str)
                                                          for r in data["run_ids"]):
        problems.append("'run_ids' must be a list of run ids (strings).")
    if not problems and STUDY_DIGEST_KEY in data and \
            data[STUDY_DIGEST_KEY] != study_digest(data):
        problems.append(f"changed since normlab wrote it: its fields no longer match its sha256 "
                        f"(study {data['study']!r}, {len(data['run_ids'])} run ids; edited by "
                        "hand, or another study's plan?).")
    return [Damage(None, path, p) for p in problems]


def lost_runs_damage(out_dir: Path, runs_dir: Path) -> list[Damage]:
    """runs/ missing or without a run folder although study.json plans runs and runs have
    started here (leases/ or report.html exists): their folders were deleted or moved."""
    path = out_dir / STUDY_FILE
    if not path.exists():
        return []
    planned = read_json(path).get("run_ids") or []
    started = (out_dir / LEASE_DIR).is_dir() or (out_dir / REPORT_FILE).exists()
    if not planned or not started:
        return []
    what = "holds no run folder" if runs_dir.is_dir() else "is missing"
    return [Damage(None, runs_dir, f"{what}, but {STUDY_FILE} plans {len(planned)} run(s) and "
                                   "runs have started in this folder: the run folders were "
                                   "deleted or moved.")]


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
    # a result.json that is damaged itself says nothing sure about its files: parse them only
    recorded = data.get(FILES_KEY) if isinstance(data, dict) and not problems else None
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
        problems += _fingerprint_problems(path, expected)
    return problems[:3]


def _fingerprint_problems(path: Path, expected: Mapping[str, Any]) -> list[str]:
    """The size, line count and (where recorded) sha256 of `path` against its record."""
    found = file_fingerprint(path)
    if (found["bytes"], found["rows"]) != (expected.get("bytes"), expected.get("rows")):
        return [f"{found['bytes']} bytes in {found['rows']} lines, but the run finished with "
                f"{expected.get('bytes')} bytes in {expected.get('rows')} lines (truncated or "
                "changed since)."]
    if "sha256" in expected and found["sha256"] != expected["sha256"]:
        return [f"changed since the run finished: same size and line count, but its sha256 is "
                f"{found['sha256'][:16]}..., not the {str(expected['sha256'])[:16]}... recorded "
                "in result.json."]
    return []


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
