"""A fake study with a divergence frontier: the fake task over 4 learning rates, replicated near
its frontier as the lr-sweep is.

The runs diverge above lr 1 and, at lr 1 itself, when seed + replicate is odd (an edge point),
so the rounds go: (1) 0.01, 0.1, 1 stable, 10 diverged: 1 and 10 are near the frontier;
(2) their replicates make 1 an edge point, so 0.1 joins; (3) 0.1's replicates are stable: done.

Importing this module registers the study "fake-frontier" (and, through fake_study, the task).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fake_study import FakeStudy
from normlab.runs.spec import RunSpec
from normlab.studies._frontier import (
    REPLICATES,
    follow_up_note,
    frontier_replicates,
    replicates_setting,
    status_series,
)
from normlab.studies._options import Option
from normlab.studies.base import StudyResults, register_study

FRONTIER_LRS = (0.01, 0.1, 1.0, 10.0)
DEFAULT_REPLICATES = 2


@register_study
class FakeFrontierStudy(FakeStudy):
    name = "fake-frontier"
    description = "The fake task over 4 learning rates, with replicates near its frontier."
    settings: ClassVar[Mapping[str, Option]] = REPLICATES

    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        return [RunSpec(task="fake", model="mlp", depth=3, norm="none", lr=lr, group="E1",
                        data=data or "digits", options={"diverge_lr": 1.0, "edge_lr": 1.0})
                for lr in FRONTIER_LRS]

    def follow_ups(self, planned: Sequence[RunSpec], results: StudyResults, scale: str,
                   settings: Mapping[str, Any]) -> list[RunSpec]:
        return frontier_replicates(planned, status_series(results.runs), ("norm",),
                                   replicates_setting(settings, DEFAULT_REPLICATES))

    def follow_up_note(self, scale: str, settings: Mapping[str, Any]) -> str:
        return follow_up_note(replicates_setting(settings, DEFAULT_REPLICATES), "per norm")
