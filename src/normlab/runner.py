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

from normlab._atomic import atomic_write_json
from normlab.config import ConfigError
from normlab.executor import Executor, LocalExecutor
from normlab.lease import run_until_settled
from normlab.preflight import duplicate_note, plan_problems
from normlab.result import RunResult
from normlab.spec import RunSpec, parse_setting, settings_help
from normlab.store import RunStore
from normlab.studies.base import Study, StudyResults, check_scale, get_study
from normlab.verify import damaged_runs, verify_store

MAX_ROUNDS = 100  # a study whose follow-ups never settle is a bug, not a plan


class ProgressReporter:
    """Receives a study's progress. The default does nothing; the CLI draws a progress display."""

    def study_start(self, study: str, planned: Sequence[RunSpec],
                    todo: Sequence[RunSpec]) -> None:
        """`planned`: the study's distinct runs; `todo`: those to run now (the rest are done)."""

    def notice(self, message: str) -> None:
        """Something the user should know before the runs start (duplicates, damaged runs)."""

    def more_runs(self, planned: Sequence[RunSpec], todo: Sequence[RunSpec],
                  reason: str) -> None:
        """A further round: `planned` is the study's runs so far, `todo` those to run now."""

    def run_progress(self, run_id: str, fraction: float, message: str) -> None: ...

    def run_end(self, spec: RunSpec, result: RunResult, done: int, total: int) -> None: ...

    def study_end(self) -> None:
        """The last call, also when the study stops early (an error, Ctrl-C)."""


def study_settings(study: Study, overrides: Mapping[str, Any] | None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the study settings, the RunSpec overrides) of `overrides`: the study's own settings
    (`Study.settings`, e.g. "replicates") parsed from CLI strings and checked, the rest left to
    `RunSpec.with_overrides`. Every bad study setting and unknown key in one ConfigError."""
    given, spec_overrides, problems = _split_overrides(study, overrides)
    if problems:
        raise ConfigError(problems)
    return given, spec_overrides


def _split_overrides(study: Study, overrides: Mapping[str, Any] | None
                     ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """`study_settings` with its problems returned (unknown keys named with the study's own
    settings among the valid ones, and left out of the RunSpec overrides)."""
    fields = {name for name, _, _ in settings_help()}
    given, spec_overrides, problems = {}, {}, []
    for key, value in (overrides or {}).items():
        option = study.settings.get(key)
        if option is None and key in fields:
            spec_overrides[key] = value
        elif option is None:
            valid = ", ".join(sorted(fields | set(study.settings)))
            problems.append(f"Unknown setting {key!r}; valid settings are {valid}.")
        else:
            try:
                given[key] = parse_setting(0, value, key)
            except ConfigError as err:
                problems += err.problems
                continue
            problem = option.problem(key, given[key], prefix="")
            problems += [problem] if problem else []
    return given, spec_overrides, problems


def plan_study(study: Study | str, scale: str = "smoke", data: str | None = None,
               overrides: Mapping[str, Any] | None = None) -> list[RunSpec]:
    """The study's RunSpecs at `scale` with `overrides` applied (its first round; see
    `follow_ups_so_far` for the rest); every bad setting reported once (a bad scale together
    with the bad overrides and study settings)."""
    study = get_study(study) if isinstance(study, str) else study
    _, overrides, problems = _split_overrides(study, overrides)
    try:
        check_scale(scale)
    except ConfigError as err:
        problems = [*err.problems, *problems]
    if problems:
        try:
            RunSpec().with_overrides(overrides)
        except ConfigError as bad:
            problems += bad.problems
        raise ConfigError(problems)
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


def new_follow_ups(study: Study, planned: Sequence[RunSpec], results: StudyResults, scale: str,
                   settings: Mapping[str, Any]) -> list[RunSpec]:
    """The follow-up runs `study` asks for given the `results` of `planned` that are not
    planned yet (distinct, in the study's order)."""
    share = results.subset([s.run_id for s in planned])
    known = set(planned)
    return [s for s in dict.fromkeys(study.follow_ups(planned, share, scale, settings))
            if s not in known]


def follow_ups_so_far(study: Study, planned: Sequence[RunSpec], results: StudyResults,
                      scale: str, overrides: Mapping[str, Any] | None = None) -> list[RunSpec]:
    """`planned` and every follow-up its rounds ask for given the finished `results` (nothing
    is run): the whole plan of a study folder as far as its results decide it."""
    settings, _ = study_settings(study, overrides)
    planned = list(dict.fromkeys(planned))
    for _ in range(MAX_ROUNDS):
        new = new_follow_ups(study, planned, results, scale, settings)
        if not new:
            return planned
        planned += new
    raise _unsettled(study)


def _unsettled(study: Study) -> RuntimeError:
    return RuntimeError(f"The follow-ups of study {study.name!r} did not settle in {MAX_ROUNDS} "
                        "rounds.")


def run_study(study: Study | str, out_dir: str | Path, scale: str = "smoke",
              data: str | None = None, overrides: Mapping[str, Any] | None = None,
              executor: Executor | None = None, progress: ProgressReporter | None = None,
              report: bool = True, preflight: bool = True) -> StudyResults:
    """Run every unfinished run of `study` into `out_dir`, then write the report.

    Before any run: the whole plan is checked (`normlab.preflight`; skip with `preflight=False`
    when the caller has just done it), and damaged runs in `out_dir` (`normlab.verify`) are moved
    to `out_dir/damaged/` to be redone. Finished runs (a result.json with status completed or
    diverged) are skipped, so an interrupted study resumes where it stopped; runs other writers
    hold are waited for (see lease.run_until_settled). Then the study's follow-ups
    (`Study.follow_ups`) run in further rounds until none is new; study.json lists every run
    planned so far. A run that ends "failed" is not retried within the call. Returns the
    study's results.
    """
    study = get_study(study) if isinstance(study, str) else study
    out_dir = Path(out_dir)
    specs = plan_study(study, scale, data, overrides)
    settings, _ = study_settings(study, overrides)
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

    def write_plan(run_ids: list[str]) -> None:
        atomic_write_json(out_dir / "study.json", {
            "study": study.name, "scale": scale, "data": data,
            "overrides": dict(overrides or {}), "run_ids": run_ids})

    write_plan([s.run_id for s in specs])
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
            run_until_settled(executor, todo, store, progress)
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
            raise _unsettled(study)
    finally:
        progress.study_end()
    results = StudyResults.load(out_dir).subset([s.run_id for s in planned])
    if report:
        from normlab.report import build_report

        build_report(out_dir)
    return results
