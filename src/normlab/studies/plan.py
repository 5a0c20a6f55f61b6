"""Planning a study: its first round of runs at a scale with the user's overrides, its own
settings (`Study.settings`), and the follow-up rounds its finished results ask for. Nothing is
run here; `normlab.runner.run_study` runs the plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from normlab.runs.spec import RunSpec, parse_setting, settings_help
from normlab.studies.base import Study, StudyResults, check_scale, get_study
from normlab.utils.config import ConfigError

MAX_ROUNDS = 100  # a study whose follow-ups never settle is a bug, not a plan


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
    raise unsettled(study)


def unsettled(study: Study) -> RuntimeError:
    return RuntimeError(f"The follow-ups of study {study.name!r} did not settle in {MAX_ROUNDS} "
                        "rounds.")
