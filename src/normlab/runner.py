"""`run_study`: expand a study into runs, skip the finished ones, execute the rest, report."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normlab._atomic import atomic_write_json
from normlab.config import ConfigError
from normlab.executor import Executor, LocalExecutor
from normlab.lease import run_until_settled
from normlab.result import RunResult
from normlab.spec import RunSpec
from normlab.store import RunStore
from normlab.studies.base import Study, StudyResults, check_scale, get_study


class ProgressReporter:
    """Receives a study's progress. The default does nothing; the CLI draws a progress display."""

    def study_start(self, study: str, total: int, skipped: int) -> None: ...

    def run_progress(self, run_id: str, fraction: float, message: str) -> None: ...

    def run_end(self, spec: RunSpec, result: RunResult, done: int, total: int) -> None: ...


def plan_study(study: Study | str, scale: str = "smoke", data: str | None = None,
               overrides: Mapping[str, Any] | None = None) -> list[RunSpec]:
    """The study's RunSpecs at `scale` with `overrides` applied; every bad setting reported once."""
    study = get_study(study) if isinstance(study, str) else study
    check_scale(scale)
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
              report: bool = True) -> StudyResults:
    """Run every unfinished run of `study` into `out_dir`, then write the report.

    Finished runs (a result.json with status completed or diverged) are skipped, so an
    interrupted study resumes where it stopped; runs other writers hold are waited for (see
    lease.run_until_settled). Returns the study's results.
    """
    study = get_study(study) if isinstance(study, str) else study
    out_dir = Path(out_dir)
    specs = plan_study(study, scale, data, overrides)
    atomic_write_json(out_dir / "study.json", {
        "study": study.name, "scale": scale, "data": data,
        "overrides": dict(overrides or {}), "run_ids": [s.run_id for s in specs],
    })
    store = RunStore(out_dir)
    todo = [s for s in dict.fromkeys(specs) if not store.is_done(s)]
    progress = progress or ProgressReporter()
    progress.study_start(study.name, len(specs), len(specs) - len(todo))
    executor = executor or LocalExecutor()
    run_until_settled(executor, todo, store, progress)
    results = StudyResults.load(out_dir).subset([s.run_id for s in specs])
    if report:
        from normlab.report import build_report

        build_report(out_dir)
    return results
