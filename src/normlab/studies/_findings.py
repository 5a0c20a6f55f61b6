"""A study's findings: its measured answer to each claim of the paper, with a verdict that says
what the scale could test, and the reason for that verdict."""

from __future__ import annotations

import math
from dataclasses import dataclass

AGREES, DIFFERS, NOT_TESTABLE = "agrees", "differs", "not testable at this scale"
MEASURED = "measured"  # a question only the review asked: no claim of the paper to compare with
FAILED = "could not be computed"  # the study's findings code raised
VERDICTS = (AGREES, DIFFERS, NOT_TESTABLE, MEASURED, FAILED)
NEEDS_REASON = (DIFFERS, NOT_TESTABLE, FAILED)
REVIEW_ONLY = ("a question of the review, not a claim of the paper: nothing to agree or differ "
               "with; the answer is in the normlab column")


@dataclass(frozen=True)
class Finding:
    """One row of the paper-vs-normlab summary.

    `verdict` is "agrees", "differs", "not testable at this scale" (the scale's budget, data or
    grid cannot decide the claim), "measured" (a measurement without a claim of the paper to
    compare with, e.g. a question only the review asked; its reason is `REVIEW_ONLY` unless
    given) or "could not be computed". "differs", "not testable" and "could not be computed"
    must come with their `reason` (refused otherwise), so the report never shows a bare
    "differs" or an empty verdict cell; `reason` may also qualify an "agrees".
    """

    experiment: str
    claim: str
    paper: str
    ours: str
    verdict: str = MEASURED
    reason: str = ""

    def __post_init__(self) -> None:
        if self.verdict == MEASURED and not self.reason:
            object.__setattr__(self, "reason", REVIEW_ONLY)
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}; got {self.verdict!r}")
        if self.verdict in NEEDS_REASON and not self.reason.strip():
            raise ValueError(f"a {self.verdict!r} verdict needs its reason ({self.experiment}: "
                             f"{self.claim!r})")


def verdict(agrees: bool, test: str) -> tuple[str, str]:
    """("agrees" or "differs", its reason) for a claim the scale could test: `test` says what
    was checked, e.g. "range ratio (no BN / BN) > 10"; unpack into Finding's last two fields."""
    return (AGREES if agrees else DIFFERS), f"test: {test}"


def verdict_if_measured(measured: float, agrees: bool, test: str) -> tuple[str, str]:
    """`verdict(agrees, test)`, or "not testable at this scale" when `measured` (the number the
    test reads) is NaN: a norm's runs or records are missing, or a value was zero."""
    if math.isnan(measured):
        return NOT_TESTABLE, (f"the number the test reads is missing (a norm's runs or records "
                              f"are absent, or a value was zero); test: {test}")
    return verdict(agrees, test)
