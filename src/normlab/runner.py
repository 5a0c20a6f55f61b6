"""`run_study`: expand a study into runs, skip the finished ones, execute the rest, report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab._atomic import atomic_write_json
from normlab.config import ConfigError
from normlab.executor import Executor, LocalExecutor
from normlab.lease import run_until_settled
from normlab.preflight import duplicate_note, plan_problems
from normlab.result import RunResult
from normlab.spec import RunSpec
from normlab.store import RunStore
from normlab.studies.base import Study, StudyResults, check_scale, get_study
from normlab.verify import damaged_runs, verify_store


class ProgressReporter:
    """Receives a study's progress. The default does nothing; the CLI draws a progress display."""

    def study_start(self, study: str, planned: Sequence[RunSpec],
                    todo: Sequence[RunSpec]) -> None:
        """`planned`: the study's distinct runs; `todo`: those to run now (the rest are done)."""

    def notice(self, message: str) -> None:
        """Something the user should know before the runs start (duplicates, damaged runs)."""

    def run_progress(self, run_id: str, fraction: float, message: str) -> None: ...

    def run_end(self, spec: RunSpec, result: RunResult, done: int, total: int) -> None: ...

    def study_end(self) -> None:
        """The last call, also when the study stops early (an error, Ctrl-C)."""


def plan_study(study: Study | str, scale: str = "smoke", data: str | None = None,
               overrides: Mapping[str, Any] | None = None) -> list[RunSpec]:
    """The study's RunSpecs at `scale` with `overrides` applied; every bad setting reported once
    (a bad scale together with the bad overrides)."""
    study = get_study(study) if isinstance(study, str) else study
    try:
        check_scale(scale)
    except ConfigError as err:
        problems = list(err.problems)
        try:
            RunSpec().with_overrides(overrides or {})
        except ConfigError as bad:
            problems += bad.problems
        raise ConfigError(problems) from None
    specs = study.specs(scale, data)
    if not overrides:
        return specs
    planned, problems = [], []
    for spec in specs:
        try:
            planned.append(spec.with_overrides(overrides))
        except ConfigError as err:
            problems.extend(p for p in err.problems if p not in problems)
    if problems:
        raise ConfigError(problems)
    return planned


def run_study(study: Study | str, out_dir: str | Path, scale: str = "smoke",
              data: str | None = None, overrides: Mapping[str, Any] | None = None,
              executor: Executor | None = None, progress: ProgressReporter | None = None,
              report: bool = True, preflight: bool = True) -> StudyResults:
    """Run every unfinished run of `study` into `out_dir`, then write the report.

    Before any run: the whole plan is checked (`normlab.preflight`; skip with `preflight=False`
    when the caller has just done it), and damaged runs in `out_dir` (`normlab.verify`) are moved
    to `out_dir/damaged/` to be redone. Finished runs (a result.json with status completed or
    diverged) are skipped, so an interrupted study resumes where it stopped; runs other writers
    hold are waited for (see lease.run_until_settled). Returns the study's results.
    """
    study = get_study(study) if isinstance(study, str) else study
    out_dir = Path(out_dir)
    specs = plan_study(study, scale, data, overrides)
    if preflight:
        problems = plan_problems(specs, out_dir)
        if problems:
            raise ConfigError(problems)
    progress = progress or ProgressReporter()
    store = RunStore(out_dir)
    damages = verify_store(out_dir)
    for run_id in damaged_runs(damages):
        where = store.set_aside(run_id)
        progress.notice(f"damaged run {run_id} moved to {where} (to be redone if planned): "
                        + "; ".join(d.problem for d in damages if d.run_id == run_id))
    atomic_write_json(out_dir / "study.json", {
        "study": study.name, "scale": scale, "data": data,
        "overrides": dict(overrides or {}), "run_ids": [s.run_id for s in specs],
    })
    note = duplicate_note(specs)
    if note:
        progress.notice(note)
    planned = list(dict.fromkeys(specs))
    todo = [s for s in planned if not store.is_done(s)]
    executor = executor or LocalExecutor()
    try:
        progress.study_start(study.name, planned, todo)
        run_until_settled(executor, todo, store, progress)
    finally:
        progress.study_end()
    results = StudyResults.load(out_dir).subset([s.run_id for s in specs])
    if report:
        from normlab.report import build_report

        build_report(out_dir)
    return results
