"""The report's HTML pieces: verdicts with their reasons, and tables that keep the page's width."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from normlab.report.html import findings_table, run_table
from normlab.studies._findings import REVIEW_ONLY, verdict, verdict_if_measured
from normlab.studies.base import AGREES, DIFFERS, FAILED, NOT_TESTABLE, Finding


def test_findings_table_shows_each_verdict_with_its_reason():
    table = findings_table([
        Finding("E1", "claim a", "paper a", "ours a", AGREES),
        Finding("E1", "claim b", "paper b", "ours b", DIFFERS, "at depth 8 only"),
        Finding("E1", "claim c", "paper c", "ours c", NOT_TESTABLE, "the budget is too short"),
        Finding("R1", "question", "not in the paper", "ours d")])
    assert '<td class="agree-yes">agrees</td>' in table
    assert 'class="agree-no">differs<span class="verdict-reason">at depth 8 only</span>' in table
    assert ('class="not-testable">not testable at this scale<span class="verdict-reason">the '
            'budget is too short</span>') in table
    # a question only the review asked: "measured" and why, never an empty cell
    assert ('class="measured">measured<span class="verdict-reason">' + REVIEW_ONLY) in table
    assert '<td class=""' not in table and not re.search(r"<td[^>]*></td>", table)
    assert table.startswith('<div class="table-wrap">')


@pytest.mark.parametrize("verdict", [DIFFERS, NOT_TESTABLE, FAILED])
def test_a_finding_names_a_known_verdict_and_a_reason_unless_it_agrees(verdict):
    with pytest.raises(ValueError, match="verdict must be one of"):
        Finding("E1", "claim", "paper", "ours", "yes")
    with pytest.raises(ValueError, match="verdict must be one of"):
        Finding("E1", "claim", "paper", "ours", None)  # no blank verdict
    for reason in ("", "  "):
        with pytest.raises(ValueError, match="needs its reason"):
            Finding("E1", "claim", "paper", "ours", verdict, reason)
    assert Finding("E1", "claim", "paper", "ours", verdict, "why").reason == "why"


def test_verdict_names_the_test_it_applied_and_a_missing_number_is_not_testable():
    assert verdict(True, "ratio > 10") == (AGREES, "test: ratio > 10")
    assert verdict(False, "ratio > 10") == (DIFFERS, "test: ratio > 10")
    assert verdict_if_measured(3.0, False, "ratio > 10") == (DIFFERS, "test: ratio > 10")
    judged, reason = verdict_if_measured(float("nan"), False, "ratio > 10")
    assert judged == NOT_TESTABLE and "missing" in reason and "ratio > 10" in reason


def test_run_table_scrolls_inside_its_box_with_key_columns_first():
    runs = pd.DataFrame({"run_id": ["a", "b"], "norm": ["none", "batch"], "lr": [0.1, 0.1],
                         "status": ["completed", "diverged"], "steps_done": [10, 3],
                         "wall_time_s": [1.0, 0.5], "lambda_max": [3.0, None],
                         "test_acc": [0.5, None]})
    html = run_table(runs)
    assert '<div class="table-wrap"><table class="runs">' in html
    runs_html = html[html.index('<table class="runs">'):]
    head = runs_html[:runs_html.index("</tr>")]
    order = [head.index(f"<th>{c}</th>") for c in ("run_id", "norm", "status", "test_acc",
                                                    "steps_done", "wall_time_s", "lambda_max")]
    assert order == sorted(order)


def test_a_largest_lr_figure_draws_when_no_lr_trained(tmp_path):
    from normlab.studies.figures import largest_lr_figure, save_figure

    table = pd.DataFrame({"norm": ["batch", "batch"], "batch_size": [2, 16],
                          "largest_trained_lr": [float("nan")] * 2,
                          "trained_censored": [False, False]})
    fig = largest_lr_figure(table, "batch_size", "batch size", log_base=2)
    paths = save_figure(fig, tmp_path, "nothing_trained", table)
    assert paths["png"].stat().st_size > 0
