"""`run_study`: expand a study into runs, skip the finished ones, execute the rest, report.

A study runs in rounds: its grid first, then the follow-up runs it asks for once it has seen
results (`Study.follow_ups`, e.g. perturbation replicates near a divergence frontier), until
no new run appears. The follow-ups are a function of the finished results, so a resumed study
plans the same runs again and skips the finished ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.execute.base import Executor
from normlab.execute.local import LocalExecutor
from normlab.execute.preflight import duplicate_note, plan_problems
from normlab.execute.progress import ProgressReporter
from normlab.execute.settle import run_until_settled
from normlab.export.live import live_log, log_to_problems
from normlab.report.build import build_report
from normlab.runs.spec import RunSpec
from normlab.runs.store import STUDY_FILE, RunStore, study_record
from normlab.runs.verify import damaged_runs, verify_store
from normlab.studies.base import Study, StudyResults, get_study
from normlab.studies.plan import MAX_ROUNDS, new_follow_ups, plan_study, study_settings, unsettled
from normlab.utils.atomic import atomic_write_json
from normlab.utils.config import ConfigError


def run_study(study: Study | str, out_dir: str | Path, scale: str = "smoke",
              data: str | None = None, overrides: Mapping[str, Any] | None = None,
              executor: Executor | None = None, progress: ProgressReporter | None = None,
              report: bool = True, preflight: bool = True,
              log_to: Sequence[str] = ()) -> StudyResults:
    """Run every unfinished run of `study` into `out_dir`, then write the report.

    Before any run: the whole plan is checked (`normlab.execute.preflight`; skip with
    `preflight=False` when the caller has just done it), and damaged runs in `out_dir`
    (`normlab.runs.verify`) are moved to `out_dir/damaged/` to be redone. Finished runs (a
    result.json with status completed or diverged) are skipped, so an interrupted study resumes
    where it stopped; runs other writers hold are waited for (see
    execute.settle.run_until_settled). Then the study's follow-ups (`Study.follow_ups`) run in
    further rounds until none is new; study.json lists every run planned so far. A run that
    ends "failed" is not retried within the call. Returns the study's results.

    `log_to` ("tensorboard:DIR", "mlflow:URI"; normlab.export.live) streams the runs to those
    tools as they run, from wherever they execute, and exports the study into them at the end.
    """
    study = get_study(study) if isinstance(study, str) else study
    out_dir = Path(out_dir)
    specs = plan_study(study, scale, data, overrides)
    settings, _ = study_settings(study, overrides)
    if preflight:
        problems = plan_problems(specs, out_dir) + log_to_problems(log_to, out_dir)
        if problems:
            raise ConfigError(problems)
    progress = progress or ProgressReporter()
    store = RunStore(out_dir)
    damages = verify_store(out_dir)
    for run_id in damaged_runs(damages):
        where = store.set_aside(run_id)
        progress.notice(f"damaged run {run_id} moved to {where} (to be redone if planned): "
                        + "; ".join(d.problem for d in damages if d.run_id == run_id))

    def write_plan(run_ids: list[str]) -> None:
        atomic_write_json(out_dir / STUDY_FILE,
                          study_record(study.name, scale, data, overrides or {}, run_ids))

    write_plan([s.run_id for s in specs])
    live = live_log(log_to, out_dir) if log_to else None
    note = duplicate_note(specs)
    if note:
        progress.notice(note)
    planned = list(dict.fromkeys(specs))
    first_round = len(planned)
    executor = executor or LocalExecutor()
    tried: set[RunSpec] = set()
    try:
        todo = [s for s in planned if not store.is_done(s)]
        progress.study_start(study.name, planned, todo)
        for round_ in range(2, MAX_ROUNDS + 2):
            if live is not None:
                live.plan(planned)
            run_until_settled(executor, todo, store, progress, live=live)
            tried.update(todo)
            new = new_follow_ups(study, planned, StudyResults.load(out_dir), scale, settings)
            if not new:
                break
            if preflight:
                problems = plan_problems(new, out_dir)
                if problems:
                    raise ConfigError(problems)
            planned += new
            write_plan([s.run_id for s in specs] + [s.run_id for s in planned[first_round:]])
            todo = [s for s in planned if s not in tried and not store.is_done(s)]
            progress.more_runs(planned, todo, f"round {round_}: {len(new)} follow-up run(s), "
                                              f"{study.follow_up_note(scale, settings)}")
        else:
            raise unsettled(study)
    finally:
        progress.study_end()
    results = StudyResults.load(out_dir).subset([s.run_id for s in planned])
    if report:
        build_report(out_dir)
    if live is not None:
        for line in live.finish():
            progress.notice(line)
    return results
