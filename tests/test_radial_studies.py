"""The `radial` and `curvature` studies: valid specs at every scale, their measurement tasks
end to end on a tiny digits run, figures and findings from the stored results."""

import math

import pandas as pd
import pytest

import normlab.studies  # noqa: F401  (registers the studies and their tasks)
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import execute_run
from normlab.studies._options import read_options
from normlab.studies._trains import stable_and_trained
from normlab.studies.base import SCALES, StudyResults, get_study
from normlab.utils.config import ConfigError

TINY = dict(data="digits", model="resnet", depth=8, width=4, batch_size=32, steps=4,
            schedule="constant", init="xavier_normal", log_every=1)


@pytest.mark.parametrize("name", ["radial", "curvature"])
@pytest.mark.parametrize("scale", SCALES)
def test_specs_are_valid_and_distinct(name, scale):
    specs = get_study(name).specs(scale)
    assert len({s.run_id for s in specs}) == len(specs)
    assert all(s.data == ("digits" if scale == "smoke" else "cifar10") for s in specs)


def test_radial_study_covers_the_three_projections():
    specs = get_study("radial").specs("smoke")
    r4 = [s for s in specs if s.group == "R4"]
    assert {s.update_projection for s in r4} == {"none", "tangential", "radial"}
    assert all(s.schedule == "constant" for s in specs)
    r2 = [s for s in specs if s.group == "R2"]
    assert all(s.probe_schedules()[0]["name"] == "radial" for s in r2)


def test_task_options_are_checked():
    from normlab.studies.curvature import SHARPNESS_TASK
    from normlab.studies.radial import TASK

    with pytest.raises(ConfigError, match="points_3d"):
        read_options(RunSpec(task=TASK, options={"points_3d": 3}))
    with pytest.raises(ConfigError, match=r"options\.span"):
        read_options(RunSpec(task=TASK, options={"span": -1.0}))
    with pytest.raises(ConfigError, match="tol"):
        read_options(RunSpec(task=SHARPNESS_TASK, options={"tol": -1.0}))


def test_largest_stable_lr_reads_statuses():
    runs = pd.DataFrame({"norm": ["a"] * 4 + ["b"] * 2,
                         "lr": [0.1, 1.0, 10.0, 100.0, 0.1, 1.0],
                         "status": ["completed", "completed", "diverged", "failed",
                                    "diverged", "diverged"],
                         "test_acc": [0.9, 0.1, math.nan, math.nan, math.nan, math.nan]})
    table = stable_and_trained(runs, ["norm"]).set_index("norm")
    assert table.loc["a", "largest_stable_lr"] == 1.0
    assert table.loc["a", "smallest_diverged_lr"] == 10.0
    assert table.loc["a", "lrs_tried"] == 3  # the failed run says nothing
    assert math.isnan(table.loc["b", "largest_stable_lr"])
    assert table.loc["a", "largest_trained_lr"] == 0.1  # at 1.0 it completed at 10 %: dead


@pytest.mark.slow
def test_tiny_studies_run_end_to_end(tmp_path):
    from normlab.studies.curvature import RANGE_TASK, SHARPNESS_TASK
    from normlab.studies.radial import TASK

    specs = [RunSpec(task=TASK, group="R2", norm=norm, lr=0.05,
                     probes=[{"name": "radial", "every": 2}],
                     options={"mean_batches": 2, "landscape_batches": 1, "points": 3,
                              "points_2d": 2}, **TINY) for norm in ("none", "batch")]
    specs += [RunSpec(group="R4", norm="batch", lr=0.05, update_projection=projection, **TINY)
              for projection in ("none", "tangential")]
    specs += [RunSpec(task=SHARPNESS_TASK, group="R9", norm="none", lr=0.05,
                      probes=[{"name": "sharpness", "every": 2, "batch": "first"}],
                      options={"hessian_batches": 1, "max_iter": 10}, **TINY),
              RunSpec(task=RANGE_TASK, group="R8", norm="none", options={"range_steps": 5},
                      **TINY)]
    for spec in specs:
        result = execute_run(spec, tmp_path)
        assert result.status == "completed", result.error
    results = StudyResults.load(tmp_path)
    runs = results.runs.set_index("group")
    assert runs.loc["R2", "mean_grad_radial_share_init"].notna().all()
    assert math.isfinite(runs.loc["R9", "lambda_max"])
    records = results.records()
    assert {"radial", "mean_gradient", "landscape", "sharpness", "final_sharpness",
            "lr_range"} <= set(records["probe"])
    landscape = records[records["probe"] == "landscape"]
    assert (landscape["bn_mode"] == "train").all()
    shares = records[(records["probe"] == "mean_gradient") & (records["norm"] == "batch")
                     & (records["quantity"] == "radial_share")]
    shares = shares[shares["layer"] != "head.fc"]  # the classifier is not normalized
    assert shares["value"].max() < 1e-3  # scale-invariant conv weights (BN eps aside)
    assert "top_singular_cosine" in set(records["quantity"])
    for name, expected in (("radial", 6), ("curvature", 3)):
        study = get_study(name)
        figures = study.figures(results, tmp_path / "figures")
        assert len(figures) == expected
        for figure in figures:
            assert all(path.exists() for path in figure.files.values())
        assert study.findings(results)


def test_every_declared_task_option_refuses_a_bad_value():
    from normlab.runs.tasks import task_problems
    from normlab.studies._options import _SCHEMAS

    assert {"gradients", "radial-probes", "curvature-probes", "lr-range", "rmt-product",
            "jacobian-spectrum", "sgd-noise"} <= set(_SCHEMAS)
    for task, schema in _SCHEMAS.items():
        assert task_problems(RunSpec(task=task, steps=2, norm="none")) == []
        for key, option in schema.options.items():
            bad = 3 if option.kind == "str" else "bad"
            problems = task_problems(RunSpec(task=task, steps=2, norm="none",
                                             options={key: bad}))
            assert any(f"'options.{key}' setting must be" in p and repr(bad) in p
                       for p in problems), (task, key, problems)
