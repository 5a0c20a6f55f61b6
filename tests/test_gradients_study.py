"""The `gradients` study end to end at a tiny size: runs, records, figures, findings."""

from __future__ import annotations

import json

import pytest

from normlab.runs.spec import RunSpec
from normlab.studies import get_study
from normlab.studies._options import read_options
from normlab.utils.config import ConfigError

TINY = {"depth": "8", "steps": "2", "batch_size": "16",
        "options": json.dumps({"measure_at": [0, 2], "step_loss_at": [0, 1],
                               "probe_batch": 4, "anatomy_points": 3, "layers": [1, 4, 8],
                               "histogram_layer": 4, "stats_every": 3})}
PROBES = ("step_loss", "gradient_histogram", "activation_stats", "output_gradients",
          "gradient_coherence", "gradient_spectrum", "step_anatomy")


def test_specs_cover_every_norm_with_recorded_init():
    from normlab.nn import list_norms
    from normlab.studies.plan import plan_study

    specs = plan_study("gradients", "smoke")
    assert sorted(s.norm for s in specs) == sorted(list_norms())
    assert {s.init for s in specs} == {"xavier_normal"} and {s.task for s in specs} == {"gradients"}
    assert {s.lr for s in specs if s.norm == "none"} == {1e-4}
    paper = plan_study("gradients", "paper")
    assert {s.depth for s in paper} == {110} and paper[0].mapping("options")["layers"] == [8, 44,
                                                                                           80]
    assert paper[0].mapping("options")["histogram_layer"] == 55


@pytest.mark.parametrize("scale", ["smoke", "reduced", "paper"])
def test_the_at_initialization_experiments_run_at_the_papers_depth_at_every_scale(scale):
    from normlab.studies.plan import plan_study

    specs = plan_study("gradients", scale)
    assert {s.depth for s in specs} == {110}
    options = specs[0].mapping("options")
    assert options["layers"] == [8, 44, 80] and options["histogram_layer"] == 55
    assert 0 in options["measure_at"] and options["step_loss_at"] == [0, 3, 6]
    assert max(options["step_loss_at"]) <= specs[0].steps  # E4's mini-batches 1, 4, 7


@pytest.mark.parametrize("options,setting", [({"bogus": 1}, "bogus"),
                                             ({"measure_at": []}, "measure_at"),
                                             ({"probe_batch": 1}, "probe_batch")])
def test_bad_task_options_are_refused(options, setting):
    spec = RunSpec(task="gradients", steps=2, options=options)
    with pytest.raises(ConfigError, match=setting):
        read_options(spec)


@pytest.mark.slow
def test_tiny_study_runs_and_draws_every_figure(tmp_path):
    from normlab.runner import run_study

    results = run_study("gradients", tmp_path, "smoke", overrides=TINY, report=False)
    assert set(results.runs["status"]) <= {"completed", "diverged"}
    records = results.records()
    assert set(PROBES) <= set(records["probe"])
    assert set(records[records["probe"] == "step_loss"]["minibatch"]) == {1, 2}
    spectrum = results.records("gradient_spectrum")
    assert set(spectrum["gradient"]) == {"per_example_loss_grads", "per_example_contributions"}
    assert set(records["bn_mode"].dropna()) == {"train"}
    study = get_study("gradients")
    pair = results.runs[results.runs["norm"].isin(["none", "batch"])]["run_id"].tolist()
    figures = study.figures(results.subset(pair), tmp_path / "figures")  # two norms: faster
    assert {f.experiment for f in figures} >= {"E3", "E4", "E5", "E6", "E7", "R6", "E8"}
    for figure in figures:
        assert "BN mode" in figure.caption
        assert all(path.exists() for path in figure.files.values())
    findings = study.findings(results)
    assert [f.experiment for f in findings] == ["E3", "E4", "E6", "E8"]
    assert all(f.paper and f.ours for f in findings)
