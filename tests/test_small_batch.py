"""The small-batch study's R1 verdict by "trains", beside its own numbers (issue 22)."""

from __future__ import annotations

import pytest

from normlab.studies.base import AGREES, DIFFERS, NOT_TESTABLE, StudyResults, get_study
from test_frontier import _small_batch

TRAINS_R1 = ("LayerNorm, GroupNorm, InstanceNorm and Batch Renormalization allow learning "
             "rates as large as BN's (largest lr that trains)")
DIVERGENCE_R1 = ("LayerNorm, GroupNorm, InstanceNorm and Batch Renormalization allow learning "
                 "rates as large as BN's (the paper's divergence criterion)")


def _findings(outcomes, tmp_path) -> dict:
    runs = _small_batch(outcomes)
    return {f.claim: f for f in get_study("small-batch").findings(StudyResults(tmp_path, runs))}


@pytest.mark.parametrize("group_curve, verdict, reason", [
    # BN trains up to 0.1 at batch 8 (diverges at 1)
    ({0.01: "..", 0.1: "..", 1.0: "DD"}, AGREES, "at least BN's"),
    ({0.01: "..", 0.1: "DD", 1.0: "DD"}, DIFFERS,
     "below BN's largest lr that trains: group 0.01 vs BN 0.1 at batch 8"),
    ({0.01: "DD", 0.1: "DD", 1.0: "DD"}, DIFFERS, "group no lr of the grid vs BN 0.1"),
])
def test_small_batch_r1_by_trains_compares_each_norm_with_bn_per_batch(
        group_curve, verdict, reason, tmp_path):
    found = _findings({("batch", 8): {0.01: "..", 0.1: "..", 1.0: "DD"},
                       ("group", 8): group_curve}, tmp_path)
    assert found[TRAINS_R1].verdict == verdict and reason in found[TRAINS_R1].reason
    assert found[TRAINS_R1].ours.startswith("largest lr that trains per batch size: 8: batch 0.1")
    # the divergence verdict sits beside the brackets only
    assert found[DIVERGENCE_R1].ours.startswith("frontier brackets per batch size: 8: batch [")
    assert "trains" not in found[DIVERGENCE_R1].ours


def test_small_batch_r1_by_trains_is_not_testable_when_both_train_at_the_grids_end(tmp_path):
    found = _findings({("batch", 8): {0.01: "..", 0.1: ".."},
                       ("group", 8): {0.01: "..", 0.1: ".."}}, tmp_path)[TRAINS_R1]
    assert found.verdict == NOT_TESTABLE
    assert "group and BN both train at the grid's largest lr at batch 8" in found.reason
