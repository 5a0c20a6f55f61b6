"""The lr-sweep study: its grid per scale, its analyses on hand-made results, a tiny real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from normlab.runner import run_study
from normlab.studies.base import StudyResults, get_study
from normlab.studies.lr_sweep import GRIDS, NORMS, PAPER_E1, LrSweepStudy, SweepGrid


def test_registered_with_its_experiments():
    study = get_study("lr-sweep")
    assert isinstance(study, LrSweepStudy)
    assert set(study.experiments) == {"E1", "E10", "R1"}


@pytest.mark.parametrize("scale", ["smoke", "reduced", "paper"])
def test_the_grid_of_each_scale(scale):
    grid = GRIDS[scale]
    specs = LrSweepStudy().specs(scale)
    groups = pd.Series([s.group for s in specs]).value_counts().to_dict()
    extra_depths = [d for d in grid.e10_depths if d != grid.depth]
    assert groups == {"sweep": len(NORMS) * len(grid.lrs) * len(grid.seeds),
                      "E10": 2 * len(extra_depths) * len(grid.lrs) * len(grid.seeds),
                      "E1": 4 * len(grid.e1_seeds)}
    assert len({s.run_id for s in specs}) == len(specs)
    assert {s.init for s in specs} == {"xavier_normal"}
    assert {s.data for s in specs} == {"digits" if scale == "smoke" else "cifar10"}
    e1 = {(s.norm, s.lr): s.epochs for s in specs if s.group == "E1"}
    assert set(e1) == set(PAPER_E1)
    assert e1[("none", 0.0001)] > e1[("batch", 0.1)]  # small learning rates train longer
    lrs = sorted({s.lr for s in specs if s.group == "sweep"})
    assert np.allclose(np.diff(np.log10(lrs)), 0.5, atol=0.03)  # half decades


def test_paper_scale_is_the_papers_setup():
    specs = LrSweepStudy().specs("paper")
    e1 = {(s.norm, s.lr): s for s in specs if s.group == "E1" and s.seed == 0}
    assert {s.depth for s in e1.values()} == {110}
    assert e1[("batch", 0.003)].epochs == 1320 and e1[("none", 0.0001)].epochs == 2400
    assert {s.seed for s in specs} == {0, 1, 2, 3, 4}
    assert {s.batch_size for s in specs} == {128}


def _runs(rows: list[tuple]) -> pd.DataFrame:
    columns = ["run_id", "group", "norm", "depth", "lr", "seed", "status", "test_acc"]
    return pd.DataFrame(rows, columns=columns).assign(
        data="digits", width=8, batch_size=64, init="xavier_normal")


def test_findings_on_known_results(tmp_path):
    rows = []
    for i, (norm, lr, status, acc) in enumerate([
            ("batch", 0.1, "completed", 0.9), ("batch", 1.0, "completed", 0.8),
            ("batch", 10.0, "diverged", np.nan), ("none", 0.1, "completed", 0.7),
            ("none", 1.0, "completed", 0.1), ("none", 10.0, "diverged", np.nan)]):
        rows.append((f"s{i}", "sweep", norm, 8, lr, 0, status, acc))
    for i, (lr, acc) in enumerate([(0.1, 0.3), (1.0, 0.1), (10.0, 0.1)]):
        rows.append((f"d{i}", "E10", "none", 20, lr, 0, "completed", acc))
    for i, ((norm, lr), acc) in enumerate(zip(PAPER_E1, (0.93, 0.90, 0.80, 0.82),
                                              strict=True)):
        rows.append((f"e{i}", "E1", norm, 8, lr, 0, "completed", acc))
    findings = LrSweepStudy().findings(StudyResults(tmp_path, _runs(rows)))
    by_claim = {f.claim: f for f in findings}
    bn = by_claim["BN trains at far larger learning rates than no normalization"]
    assert bn.agree is True and "BN 1" in bn.ours and "none 0.1" in bn.ours
    assert by_claim["With BN, a larger learning rate gives better final test accuracy"].agree
    matched = by_claim["At a matched small learning rate (1e-4) BN gives no advantage"]
    assert matched.agree is True and "80.0 %" in matched.ours
    depth = by_claim["Without normalization, deeper networks tolerate smaller learning rates"]
    assert depth.agree is True  # depth 8 trains up to 0.1, depth 20 at none of the grid
    assert "depth 20: none of the grid" in depth.ours


def test_stable_lr_figure_marks_the_censored_grid_end(tmp_path):
    from normlab.studies._lr_sweep_figures import _both_criteria

    runs = _runs([("a", "sweep", "batch", 8, 0.1, 0, "completed", 0.9),
                  ("b", "sweep", "batch", 1.0, 0, 0, "completed", 0.2),
                  ("c", "sweep", "none", 8, 0.1, 0, "completed", 0.6),
                  ("d", "sweep", "none", 8, 1.0, 0, "diverged", np.nan)])
    runs.loc[1, ["depth", "lr"]] = [8, 1.0]
    table = _both_criteria(runs, ["norm"], 0.5).set_index(["criterion", "norm"])
    no_div = table.loc["no divergence"]
    trains = table.loc["trains (test acc >= 50%)"]
    assert no_div.loc["batch", "largest_stable_lr"] == 1.0 and no_div.loc["batch", "censored"]
    assert trains.loc["batch", "largest_stable_lr"] == 0.1
    assert not trains.loc["batch", "censored"]
    assert no_div.loc["none", "largest_stable_lr"] == 0.1


def test_an_lr_is_stable_only_if_every_seed_was():
    from normlab.studies._lr_sweep_figures import _both_criteria

    runs = _runs([("a", "sweep", "batch", 8, 0.1, 0, "completed", 0.9),
                  ("b", "sweep", "batch", 8, 0.1, 1, "completed", 0.4),
                  ("c", "sweep", "batch", 8, 1.0, 0, "completed", 0.9),
                  ("d", "sweep", "batch", 8, 1.0, 1, "diverged", np.nan)])
    table = _both_criteria(runs, ["norm"], 0.5).set_index("criterion")
    assert table.loc["no divergence", "largest_stable_lr"] == 0.1  # one seed diverged at 1.0
    assert np.isnan(table.loc["trains (test acc >= 50%)", "largest_stable_lr"])  # seed 1: 40 %


TINY = SweepGrid(depth=8, width=4, batch_size=32, epochs=1, lrs=(0.1, 1e3), seeds=(0,),
                 e10_depths=(14,), e1_depth=8,
                 e1_runs=(("batch", 0.1, 2), ("batch", 0.003, 2), ("batch", 0.0001, 2),
                          ("none", 0.0001, 2)),
                 e1_seeds=(0,), log_every=2, norms=("none", "batch"))


@pytest.mark.slow
def test_a_tiny_sweep_runs_end_to_end_and_draws_its_figures(tmp_path: Path):
    study = LrSweepStudy({"smoke": TINY})
    overrides = {"steps": 4, "data": "synthetic", "data_options": {"n_train": 64, "n_test": 32}}
    results = run_study(study, tmp_path, scale="smoke", overrides=overrides, report=False)
    runs = results.runs
    assert len(runs) == 4 + 4 + 4
    assert set(runs.loc[runs["lr"] == 1e3, "status"]) == {"diverged"}  # and the study went on
    assert set(runs.loc[runs["lr"] < 1, "status"]) == {"completed"}
    figures = study.figures(results, tmp_path / "figures")
    assert {f.name for f in figures} == {"accuracy_vs_lr", "largest_stable_lr",
                                         "stable_lr_vs_depth", "e1_accuracy"}
    assert {f.experiment for f in figures} == {"R1", "E10", "E1"}
    for figure in figures:
        assert {p.suffix for p in figure.files.values()} == {".png", ".pdf", ".csv"}
        assert all(p.stat().st_size > 0 for p in figure.files.values())
        assert "mode" in figure.caption
    curves = pd.read_csv(tmp_path / "figures" / "e1_accuracy.csv")
    assert set(curves["percent"]) == {50.0, 100.0}  # two epochs of 2 steps: two evals
    assert study.findings(results)
