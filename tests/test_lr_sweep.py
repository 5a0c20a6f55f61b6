"""The lr-sweep study: its grid per scale, its analyses on hand-made results, a tiny real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from normlab.runner import run_study
from normlab.studies import _lr_sweep_figures as sweep_figures
from normlab.studies._lr_sweep_figures import stable_lr_vs_depth
from normlab.studies._trains import (
    TRAINS_DEFINITION,
    TRAINS_MIN_TEST_ACC,
    stable_and_trained,
    trains,
)
from normlab.studies.base import (
    AGREES,
    DIFFERS,
    MEASURED,
    NOT_TESTABLE,
    VERDICTS,
    StudyResults,
    get_study,
)
from normlab.studies.lr_sweep import GRIDS, NORMS, PAPER_E1, LrSweepStudy, SweepGrid
from normlab.utils.config import ConfigError


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


def _sweep(limits: dict[str, tuple[float, float]], lrs=(0.1, 1.0, 10.0), depth=8,
           group="sweep") -> list[tuple]:
    """Runs of a sweep: per norm (largest stable lr, final test accuracy of stable runs);
    every lr above the limit diverged."""
    return [(f"{group}-{norm}-{lr}-{depth}", group, norm, depth, lr, 0,
             "completed" if lr <= limit else "diverged", acc if lr <= limit else np.nan)
            for norm, (limit, acc) in limits.items() for lr in lrs]


def _e1(test_accs=(0.93, 0.90, 0.80, 0.82), train_acc=1.0) -> pd.DataFrame:
    rows = [(f"e{i}", "E1", norm, 8, lr, 0, "completed", acc)
            for i, ((norm, lr), acc) in enumerate(zip(PAPER_E1, test_accs, strict=True))]
    return _runs(rows).assign(train_acc=train_acc)


def _findings(runs: pd.DataFrame, tmp_path) -> dict:
    findings = LrSweepStudy().findings(StudyResults(tmp_path, runs))
    return {f.claim.replace(" (the paper's divergence criterion)", ""): f for f in findings}


R1 = "BN's divergence frontier lies at far larger learning rates than no normalization's"
R1_TRAINS = "BN trains at larger learning rates than no normalization (largest lr that trains)"
E10 = "Without normalization, deeper networks tolerate smaller learning rates"
E1_ORDER = "With BN, a larger learning rate gives better final test accuracy"
E1_MATCHED = "At a matched small learning rate (1e-4) BN gives no advantage"


def test_r1_agrees_when_bn_is_stable_at_larger_rates(tmp_path):
    found = _findings(_runs(_sweep({"batch": (1.0, 0.9), "none": (0.1, 0.7)})), tmp_path)
    assert found[R1].verdict == AGREES and "depth 8" in found[R1].reason
    assert found[R1].ours == "frontier bracket: BN [1, 10], no norm [0.1, 1]"


def test_r1_differs_when_no_norms_bracket_lies_above_bns(tmp_path):
    found = _findings(_runs(_sweep({"batch": (0.1, 0.9), "none": (1.0, 0.7)})), tmp_path)
    assert found[R1].verdict == DIFFERS and "depth 8" in found[R1].reason


def test_r1_uses_the_divergence_criterion_not_accuracy(tmp_path):
    # no norm never reaches the "trains" accuracy, but its frontier lies in the same grid step
    # as BN's: by the paper's criterion the grid cannot tell them apart
    found = _findings(_runs(_sweep({"batch": (1.0, 0.9), "none": (1.0, 0.1)})), tmp_path)
    assert found[R1].verdict == NOT_TESTABLE and "depth 8" in found[R1].reason
    assert "brackets overlap (BN [1, 10], no norm [1, 10])" in found[R1].reason
    # "trains" is its own finding, with its own verdict beside its own numbers
    assert found[R1_TRAINS].verdict == AGREES
    assert found[R1_TRAINS].ours == ("largest lr that trains: depth 8: BN 1, no norm no lr of "
                                     "the grid")


def test_r1_is_not_testable_when_an_edge_band_makes_the_brackets_overlap(tmp_path):
    runs = _runs(_sweep({"batch": (1.0, 0.9), "none": (0.1, 0.7)}))
    # a replicate of BN at 1.0 diverged: BN's bracket widens to [0.1, 10] and meets no norm's
    runs.loc[len(runs)] = ["replica", "sweep", "batch", 8, 1.0, 0, "diverged", np.nan,
                           "digits", 8, 64, "xavier_normal"]
    found = _findings(runs, tmp_path)
    assert found[R1].verdict == NOT_TESTABLE
    assert "BN [0.1, 10], no norm [0.1, 1]" in found[R1].reason


def test_r1_is_not_testable_when_both_are_stable_at_the_grids_end(tmp_path):
    found = _findings(_runs(_sweep({"batch": (10.0, 0.9), "none": (10.0, 0.1)})), tmp_path)
    assert found[R1].verdict == NOT_TESTABLE and "(10)" in found[R1].reason
    assert "BN [10, > 10], no norm [10, > 10]" in found[R1].ours


def test_e1_agrees_and_differs_on_fitted_runs(tmp_path):
    found = _findings(_e1(), tmp_path)
    assert found[E1_ORDER].verdict == AGREES and found[E1_MATCHED].verdict == AGREES
    assert "80.0 %" in found[E1_MATCHED].ours
    found = _findings(_e1(test_accs=(0.93, 0.90, 0.60, 0.82)), tmp_path)
    assert found[E1_MATCHED].verdict == AGREES  # BN below no norm: still no advantage
    found = _findings(_e1(test_accs=(0.80, 0.90, 0.95, 0.60)), tmp_path)
    assert found[E1_ORDER].verdict == DIFFERS and found[E1_MATCHED].verdict == DIFFERS


def test_e1_is_not_testable_when_the_budget_does_not_fit_the_training_set(tmp_path):
    runs = _e1()
    runs.loc[runs["lr"] == 0.0001, "train_acc"] = 0.5
    found = _findings(runs, tmp_path)
    for claim in (E1_ORDER, E1_MATCHED):
        assert found[claim].verdict == NOT_TESTABLE
        assert "BN 0.0001: 50 %" in found[claim].reason and "no norm 0.0001: 50 %" in \
            found[claim].reason


def test_e10_reads_the_brackets_with_censored_ends(tmp_path):
    rows = _sweep({"none": (10.0, 0.5)}) + _sweep({"none": (0.1, 0.5)}, depth=20, group="E10")
    found = _findings(_runs(rows), tmp_path)
    assert found[E10].verdict == AGREES
    assert "depth 8: [10, > 10], depth 20: [0.1, 1]" in found[E10].ours
    # the deep network is stable at 10, where the shallow one always diverged
    rows = _sweep({"none": (1.0, 0.5)}) + _sweep({"none": (10.0, 0.5)}, depth=20, group="E10")
    assert _findings(_runs(rows), tmp_path)[E10].verdict == DIFFERS
    rows = _sweep({"none": (0.1, 0.5)}) + _sweep({"none": (1.0, 0.5)}, depth=20, group="E10")
    assert _findings(_runs(rows), tmp_path)[E10].verdict == DIFFERS
    # the shallow frontier lies above 1 (never reached), the deep one in (1, 10]: open
    rows = _sweep({"none": (1.0, 0.5)}, lrs=(0.1, 1.0)) + _sweep({"none": (1.0, 0.5)}, depth=20,
                                                                  group="E10")
    found = _findings(_runs(rows), tmp_path)[E10]
    assert found.verdict == NOT_TESTABLE
    assert "brackets overlap (depth 8 [1, > 1], depth 20 [1, 10])" in found.reason


def test_e1_is_not_testable_when_an_e1_lr_is_not_below_its_bracket(tmp_path):
    # at the E1 depth BN always diverged at 0.1 in the sweep: E1's BN at 0.1 is chance or worse
    rows = _sweep({"batch": (0.01, 0.9), "none": (0.01, 0.5)}, lrs=(0.01, 0.1, 1.0))
    runs = pd.concat([_runs(rows), _e1()], ignore_index=True)
    found = _findings(runs, tmp_path)
    for claim in (E1_ORDER, E1_MATCHED):
        assert found[claim].verdict == NOT_TESTABLE
        assert "BN at 0.1 is not below its frontier bracket [0.01, 0.1] at depth 8" in \
            found[claim].reason
    rows = _sweep({"batch": (1.0, 0.9), "none": (0.01, 0.5)}, lrs=(0.01, 0.1, 1.0))
    found = _findings(pd.concat([_runs(rows), _e1()], ignore_index=True), tmp_path)
    assert found[E1_ORDER].verdict == AGREES


def test_the_e10_figure_data_marks_censored_limits(tmp_path):
    rows = _sweep({"none": (10.0, 0.5), "batch": (10.0, 0.9)})
    rows += _sweep({"none": (0.1, 0.5), "batch": (10.0, 0.1)}, depth=20, group="E10")
    figure = stable_lr_vs_depth(StudyResults(tmp_path, _runs(rows)), tmp_path / "figures")
    data = pd.read_csv(figure.files["csv"]).set_index(["norm", "depth"])
    assert data.loc[("none", 8), "stable_censored"] and data.loc[("none", 8),
                                                                 "largest_stable_lr"] == 10
    assert not data.loc[("none", 20), "stable_censored"]
    assert data.loc[("batch", 20), "stable_censored"]
    assert np.isnan(data.loc[("batch", 20), "largest_trained_lr"])  # 10 %: it does not train
    assert "'>='" in figure.caption


def test_an_lr_is_stable_only_if_every_seed_was():
    runs = _runs([("a", "sweep", "batch", 8, 0.1, 0, "completed", 0.9),
                  ("b", "sweep", "batch", 8, 0.1, 1, "completed", 0.15),
                  ("c", "sweep", "batch", 8, 1.0, 0, "completed", 0.9),
                  ("d", "sweep", "batch", 8, 1.0, 1, "diverged", np.nan)])
    table = stable_and_trained(runs, ["norm"]).set_index("norm")
    assert table.loc["batch", "largest_stable_lr"] == 0.1  # one seed diverged at 1.0
    assert np.isnan(table.loc["batch", "smallest_always_diverged_lr"])  # p(1.0) = 0.5
    assert table.loc["batch", "edge_lrs"] == 1
    assert np.isnan(table.loc["batch", "largest_trained_lr"])  # seed 1 at 0.1: 15 %


def test_one_definition_of_trains():
    runs = pd.DataFrame({"status": ["completed", "completed", "diverged", "failed"],
                         "test_acc": [TRAINS_MIN_TEST_ACC, TRAINS_MIN_TEST_ACC - 0.01, 0.9,
                                      0.9]})
    assert trains(runs).tolist() == [True, False, False, False]
    assert f"{TRAINS_MIN_TEST_ACC:.0%}" in TRAINS_DEFINITION
    import normlab.studies as package

    for module in Path(package.__file__).parent.glob("*.py"):  # no study keeps its own
        text = module.read_text()
        assert "MIN_ACC =" not in text and "TRAINS_ACC =" not in text, module.name


def test_scales_are_keyword_configurations_with_clear_errors():
    with pytest.raises(ConfigError, match=r"'scale' setting must be one of 'smoke', 'reduced', "
                                          r"'paper'; got 'huge'"):
        LrSweepStudy().specs("huge")
    with pytest.raises(ConfigError, match=r"Unknown field 'depths' of SweepGrid; its fields "
                                          r"are depth, width"):
        GRIDS["smoke"].replace(depths=(8,))
    with pytest.raises(ConfigError, match=r"The field 'e1_runs' of SweepGrid is required"):
        SweepGrid.make(**{k: v for k, v in vars(GRIDS["smoke"]).items() if k != "e1_runs"})
    assert GRIDS["smoke"].replace(seeds=(0, 1)).seeds == (0, 1)


@pytest.mark.parametrize("name", ["lr-sweep", "gradients", "radial", "curvature", "rmt", "init",
                                  "noise-scale", "small-batch", "paper"])
def test_every_study_refuses_an_unknown_scale(name):
    with pytest.raises(ConfigError, match="'huge'"):
        get_study(name).specs("huge")


TINY = SweepGrid(depth=8, width=4, batch_size=32, epochs=1, lrs=(0.1, 1e3), seeds=(0,),
                 e10_depths=(14,), e1_depth=8,
                 e1_runs=(("batch", 0.1, 2), ("batch", 0.003, 2), ("batch", 0.0001, 2),
                          ("none", 0.0001, 2)),
                 e1_seeds=(0,), log_every=2, norms=("none", "batch"), replicates=1)


@pytest.mark.slow
def test_a_tiny_sweep_runs_end_to_end_and_draws_its_figures(tmp_path: Path):
    study = LrSweepStudy({"smoke": TINY})
    overrides = {"steps": 4, "data": "synthetic", "data_options": {"n_train": 64, "n_test": 32}}
    results = run_study(study, tmp_path, scale="smoke", overrides=overrides, report=False)
    runs = results.runs
    # the grid, then one replicate of both points of each of the four curves (sweep and E10,
    # none and batch): each curve steps from p = 0 to p = 1 between its two lrs
    assert len(runs) == 4 + 4 + 4 + 4 * 2
    assert set(runs.loc[runs["lr"] == 1e3, "status"]) == {"diverged"}  # and the study went on
    assert set(runs.loc[runs["lr"] < 1, "status"]) == {"completed"}
    replicated = runs.groupby("lr")["options.replicate"].count()
    assert replicated[replicated > 0].to_dict() == {0.1: 4, 1e3: 4}
    figures = study.figures(results, tmp_path / "figures")
    assert {f.name for f in figures} == {"divergence_vs_lr", "accuracy_vs_lr",
                                         "largest_stable_lr", "stable_lr_vs_depth",
                                         "e1_accuracy"}
    assert {f.experiment for f in figures} == {"R1", "E10", "E1"}
    for figure in figures:
        assert {p.suffix for p in figure.files.values()} == {".png", ".pdf", ".csv"}
        assert all(p.stat().st_size > 0 for p in figure.files.values())
        assert "mode" in figure.caption
    curves = pd.read_csv(tmp_path / "figures" / "e1_accuracy.csv")
    assert set(curves["percent"]) == {50.0, 100.0}  # two epochs of 2 steps: two evals
    assert study.findings(results)


def _curve(norm: str, depth: int, group: str, outcomes: dict[float, float | None]
           ) -> list[tuple]:
    """One run per lr: its final test accuracy, or None where it diverged."""
    return [(f"{group}-{norm}-{lr}-{depth}", group, norm, depth, lr, 0,
             "diverged" if acc is None else "completed", np.nan if acc is None else acc)
            for lr, acc in outcomes.items()]


def test_r1_by_trains_agrees_when_bns_limit_is_10x_larger_at_both_depths(tmp_path):
    # issue 22: no norm never diverges (its runs go dead instead), so by divergence its bracket
    # lies above BN's; but BN trains at 1 and no norm only at 0.1, at both depths. The verdict
    # beside those "trains" numbers must be "agrees", and the divergence one says why it differs.
    rows = []
    for depth, group in ((8, "sweep"), (20, "E10")):
        rows += _curve("batch", depth, group, {0.1: 0.9, 1.0: 0.9, 10.0: None})
        rows += _curve("none", depth, group, {0.1: 0.5, 1.0: 0.1, 10.0: 0.1})
    found = _findings(_runs(rows), tmp_path)
    assert found[R1_TRAINS].verdict == AGREES
    assert found[R1_TRAINS].ours == ("largest lr that trains: depth 8: BN 1, no norm 0.1; "
                                     "depth 20: BN 1, no norm 0.1")
    assert found[R1].verdict == DIFFERS
    assert found[R1].reason.startswith("at depth 8 no norm's bracket lies at or above BN's")
    assert found[R1].ours == "frontier bracket: BN [1, 10], no norm [10, > 10]"


@pytest.mark.parametrize("none_at_depth_20, verdict, reason", [
    ({0.1: 0.5, 1.0: 0.5, 10.0: 0.1}, DIFFERS,
     "no norm trains at an lr as large as BN's or larger at depth 20 (BN 1, no norm 1)"),
    ({0.1: 0.1, 1.0: 0.1, 10.0: 0.1}, AGREES, "at every depth"),  # no norm trains at no lr
])
def test_r1_by_trains_differs_where_one_depth_lets_no_norm_train_as_high(
        none_at_depth_20, verdict, reason, tmp_path):
    rows = _curve("batch", 8, "sweep", {0.1: 0.9, 1.0: 0.9, 10.0: None})
    rows += _curve("none", 8, "sweep", {0.1: 0.5, 1.0: 0.1, 10.0: None})
    rows += _curve("batch", 20, "E10", {0.1: 0.9, 1.0: 0.9, 10.0: None})
    rows += _curve("none", 20, "E10", none_at_depth_20)
    found = _findings(_runs(rows), tmp_path)[R1_TRAINS]
    assert found.verdict == verdict and reason in found.reason


def test_r1_by_trains_is_not_testable_where_the_grid_misses_both_limits(tmp_path):
    rows = _curve("batch", 8, "sweep", {0.1: 0.9, 1.0: 0.9})
    rows += _curve("none", 8, "sweep", {0.1: 0.5, 1.0: 0.5})
    found = _findings(_runs(rows), tmp_path)[R1_TRAINS]
    assert found.verdict == NOT_TESTABLE
    assert found.reason == ("the grid does not reach the limits at depth 8 (BN >= 1, no norm "
                            ">= 1): both train at the grid's largest lr")
    rows = _curve("batch", 8, "sweep", {0.1: 0.1, 1.0: None})
    rows += _curve("none", 8, "sweep", {0.1: 0.1, 1.0: None})
    found = _findings(_runs(rows), tmp_path)[R1_TRAINS]
    assert found.verdict == NOT_TESTABLE and "neither trains at any lr of the grid" in found.reason


def test_every_verdict_of_the_sweep_has_its_reason_and_no_cell_is_blank(tmp_path):
    rows = _sweep({norm: (1.0, 0.9) for norm in NORMS})
    rows += _sweep({"none": (10.0, 0.5)}, depth=20, group="E10")  # E10 differs
    found = _findings(pd.concat([_runs(rows), _e1()], ignore_index=True), tmp_path)
    e10 = found[E10]
    assert e10.verdict == DIFFERS
    assert e10.reason == ("the deeper network's bracket lies at or above the shallower one's: "
                          "depth 20 [10, > 10] vs depth 8 [1, 10]")
    alternatives = [f for f in found.values() if f.claim.endswith("as large as BN's")]
    assert len(alternatives) == 4
    assert {f.verdict for f in alternatives} == {MEASURED}  # the review's question: no claim
    for finding in found.values():
        assert finding.verdict in VERDICTS and finding.reason, finding


def test_the_e10_figure_names_bns_trains_line_lying_on_its_no_divergence_line(tmp_path):
    # BN is stable and trains at every lr at both depths: its two lines coincide
    rows = []
    for depth, group in ((8, "sweep"), (20, "E10")):
        rows += _curve("batch", depth, group, {0.1: 0.9, 1.0: 0.9})
        rows += _curve("none", depth, group, {0.1: 0.5, 1.0: None})
    draw = sweep_figures.stable_lr_vs_depth.__wrapped__
    fig, _ = draw(StudyResults(tmp_path, _runs(rows)))
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "batch: trains (= batch: no divergence)" in texts
    assert "none: trains (= none: no divergence)" in texts


def test_the_divergence_figure_names_norms_with_the_same_curve(tmp_path, monkeypatch):
    rows = []
    for norm, outcomes in (("batch", {0.1: 0.9, 1.0: 0.9, 10.0: None}),
                           ("group", {0.1: 0.9, 1.0: 0.9, 10.0: None}),
                           ("none", {0.1: 0.5, 1.0: None, 10.0: None})):
        rows += _curve(norm, 20, "sweep", outcomes)
        rows += _curve(norm, 8, "E10", outcomes) if norm != "group" else []
        rows += _curve("layer", 8, "E10", outcomes) if norm == "group" else []
    drawn = []
    monkeypatch.setattr(sweep_figures, "saved_figure",
                        lambda fig, *args: drawn.append(fig) or None)
    sweep_figures.divergence_vs_lr(StudyResults(tmp_path, _runs(rows)), tmp_path)
    first, second = drawn[0].axes[0], drawn[0].axes[1]  # depth 20 (legend), depth 8
    assert [t.get_text() for t in first.get_legend().get_texts()] == [
        "none", "batch", "group (= batch)"]
    assert "same curve (nudged): layer = batch" in [t.get_text() for t in second.texts]
