"""A study's findings: its measured answer to each claim of the paper, with a verdict that says
what the scale could test."""

from __future__ import annotations

from dataclasses import dataclass

AGREES, DIFFERS, NOT_TESTABLE = "agrees", "differs", "not testable at this scale"
VERDICTS = (AGREES, DIFFERS, NOT_TESTABLE)


@dataclass(frozen=True)
class Finding:
    """One row of the paper-vs-normlab summary.

    `verdict` is "agrees", "differs" or "not testable at this scale" (the scale's budget, data or
    grid cannot decide the claim; `reason` then says why), or None for a measurement without a
    claim to compare with (e.g. a question only the review asked). `reason` may also qualify
    an "agrees" or a "differs".
    """

    experiment: str
    claim: str
    paper: str
    ours: str
    verdict: str | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS} or None; got {self.verdict!r}")
        if self.verdict == NOT_TESTABLE and not self.reason:
            raise ValueError("a 'not testable' verdict needs its reason")


def verdict(agrees: bool) -> str:
    """"agrees" or "differs" for a claim the scale could test."""
    return AGREES if agrees else DIFFERS
