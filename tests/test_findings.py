"""Every verdict of every study comes with its reason, on a tiny hand-made results table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from normlab.studies.base import (
    AGREES,
    VERDICTS,
    StudyResults,
    _spec_columns,
    get_study,
    list_studies,
)

# the composite "paper" study reads its members' folders; its findings are theirs
STUDIES = [name for name in list_studies() if name != "paper"]


def _tiny_results(name: str, tmp_path) -> StudyResults:
    """The study's smoke plan as finished runs: lr >= 1 diverged, the others completed with
    accuracies that vary from run to run, and the per-run metrics the studies read."""
    rows = []
    for i, spec in enumerate(get_study(name).specs("smoke")):
        diverged = spec.lr >= 1.0
        rows.append({**_spec_columns(spec.to_dict()), "run_id": spec.run_id,
                     "status": "diverged" if diverged else "completed",
                     "test_acc": np.nan if diverged else 0.1 + 0.08 * (i * 7 % 10),
                     "train_acc": np.nan if diverged else 0.97,
                     "sv_max": 1.0 + i % 3, "sv_tiny_share": 0.1 * (i % 4), "sv_rms": 1.0,
                     "jac_condition": 1.0 + i, "lambda_max": 10.0 / (1 + i % 5),
                     "lr_at_min": 0.1})
    return StudyResults(tmp_path, pd.DataFrame(rows))


@pytest.mark.parametrize("name", STUDIES)
def test_every_verdict_of_every_study_has_its_reason(name, tmp_path):
    for finding in get_study(name).findings(_tiny_results(name, tmp_path)):
        assert finding.verdict in VERDICTS, finding
        if finding.verdict != AGREES:
            assert finding.reason.strip(), finding


def test_the_tiny_tables_reach_the_differs_and_measured_verdicts(tmp_path):
    # the table above is not vacuous: it drives studies to "differs" and "measured" verdicts
    verdicts = {f.verdict for name in ("lr-sweep", "noise-scale", "init", "rmt")
                for f in get_study(name).findings(_tiny_results(name, tmp_path / name))}
    assert {"differs", "measured"} <= verdicts
