"""Perturbation replicates near a divergence frontier: the follow-up round of a learning-rate grid.

A study's first round runs its grid once per seed. Each curve (p(diverge) against lr for one
setting of the other columns, `studies._trains`) then has a frontier, and the points within
one grid step of it are the ones whose outcome a bit-level perturbation can flip. Those points
get `replicates` perturbation replicates per seed (`options.replicate` = 1..R: the same run
from initial weights perturbed by a relative 1e-7, train/build.py); points far from the
frontier get none. The replicates may move the frontier (a point that looked stable diverges
in a replicate), so the study asks again after each round (`runner.run_study` runs rounds until
no new run appears), and every point next to the frontier ends up measured with replicates.

"Within one grid step": a point is near the frontier when its p is strictly between 0 and 1,
or when its class (p = 0, 0 < p < 1, p = 1) differs from that of a neighbour on the lr grid;
the grid's ends are read as if p were 0 below the smallest lr and 1 above the largest, so a
curve that never diverges replicates its largest lr, and one that always diverges its
smallest. Cost: pure pandas over the planned specs and their statuses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from normlab.runs.spec import RunSpec
from normlab.studies._options import Option
from normlab.studies._trains import point_table

REPLICATE = "replicate"  # the train task's option (train/build.py)
# The study setting (`--set replicates=R`): replicates per seed of each point near a frontier;
# None (not given) means the scale's default.
REPLICATES = {"replicates": Option(None, kind="int", low=0, optional=True)}


def replicate_of(spec: RunSpec) -> int:
    """The spec's perturbation replicate (0: the unperturbed run)."""
    return int(spec.mapping("options").get(REPLICATE, 0))


def with_replicate(spec: RunSpec, replicate: int) -> RunSpec:
    """`spec` as perturbation replicate `replicate` (>= 1) of its point."""
    return spec.replace(options={**spec.mapping("options"), REPLICATE: replicate})


def _class(p: float) -> int:
    return 0 if p == 0 else 2 if p == 1 else 1


def near_frontier(points: pd.DataFrame) -> list[float]:
    """The lrs of one curve (`point_table` rows of one setting) within one grid step of its
    frontier (see the module docstring); points without a finished run are left out."""
    ordered = points.dropna(subset=["p_diverge"]).sort_values("lr")
    classes = [0, *(_class(p) for p in ordered["p_diverge"]), 2]  # virtual ends: 0 below, 1 above
    lrs = ordered["lr"].to_list()
    return [lr for i, lr in enumerate(lrs, start=1)
            if classes[i] == 1 or classes[i] != classes[i - 1] or classes[i] != classes[i + 1]]


def frontier_replicates(planned: Sequence[RunSpec], statuses: pd.Series, by: Sequence[str],
                        replicates: int,
                        include: Callable[[RunSpec], bool] = lambda spec: True
                        ) -> list[RunSpec]:
    """Replicates 1..`replicates` of every unperturbed planned run (that `include` accepts) whose
    point is near its curve's frontier; curves are the settings of `by` (RunSpec fields), the
    points their lrs. `statuses` maps run ids to status (missing: not finished)."""
    if replicates < 1:
        return []
    chosen = [s for s in planned if include(s)]
    if not chosen:
        return []
    table = pd.DataFrame([{**{c: getattr(s, c) for c in by}, "lr": s.lr,
                           "status": statuses.get(s.run_id, "unfinished")} for s in chosen])
    points = point_table(table, list(by))
    near = set()
    for key, curve in points.groupby(list(by), dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        near |= {(*key, lr) for lr in near_frontier(curve)}
    return [with_replicate(s, r) for s in chosen
            if replicate_of(s) == 0 and (*(getattr(s, c) for c in by), s.lr) in near
            for r in range(1, replicates + 1)]


def replicates_setting(settings: Mapping[str, Any], default: int) -> int:
    """The `replicates` study setting the user gave, else the scale's `default`."""
    given = settings.get("replicates")
    return default if given is None else int(given)


def follow_up_note(replicates: int, curves: str) -> str:
    """What the follow-up rounds of a study with replicates add, in one phrase."""
    if replicates < 1:
        return "none (replicates=0: one run per seed and point)"
    return (f"{replicates} perturbation replicate(s) per seed of every point within one grid "
            f"step of a divergence frontier ({curves}), decided from the results")


def status_series(runs: pd.DataFrame) -> pd.Series:
    """run_id -> status of a runs table (empty when there are no runs)."""
    if runs.empty or "run_id" not in runs:
        return pd.Series(dtype=object)
    return pd.Series(runs["status"].to_numpy(), index=runs["run_id"].to_numpy())

