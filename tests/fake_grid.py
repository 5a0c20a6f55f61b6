"""A bigger fake study for the shared-store tests: 4 learning rates x 3 seeds of the fake task.

Importing this module registers the study "fake-grid" (and, through fake_study, the task).
"""

from __future__ import annotations

from pathlib import Path

from fake_study import LRS, FakeStudy
from normlab.runs.spec import RunSpec
from normlab.studies.base import register_study

SEEDS = (0, 1, 2)


@register_study
class FakeGridStudy(FakeStudy):
    name = "fake-grid"
    description = "The fake task over 4 learning rates x 3 seeds."

    def specs(self, scale: str, data: str | None = None) -> list[RunSpec]:
        return [RunSpec(task="fake", model="mlp", depth=3, norm="none", lr=lr, seed=seed,
                        data=data or "digits", group="E1")
                for lr in (*LRS, 3.0) for seed in SEEDS]


def study_command(out: Path, *extra: str, study: str = "fake-grid") -> list[str]:
    """argv of a `normlab run STUDY` process (the test folder on its path), with Ctrl-C raising
    KeyboardInterrupt as in a terminal even when the tests themselves run with SIGINT ignored
    (a background job of a non-interactive shell), which the process would inherit."""
    import sys

    tests = str(Path(__file__).parent)
    code = (f"import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.path.insert(0, {tests!r}); import fake_grid; "
            "from normlab.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, "run", study, "--out", str(out), *extra]
