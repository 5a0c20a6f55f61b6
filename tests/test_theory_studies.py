"""The theory studies (rmt, init, noise-scale, small-batch) end to end at a tiny size, their
grids at smoke scale, their measurement tasks' settings, and the lr table they read."""

from __future__ import annotations

import pandas as pd
import pytest

from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext, get_task
from normlab.studies import Finding, get_study, noise_scale, rmt, small_batch
from normlab.studies import init as init_study
from normlab.studies._options import read_options
from normlab.studies._theory_tasks import JACOBIAN_TASK, NOISE_TASK, RMT_TASK
from normlab.studies._trains import stable_and_trained
from normlab.utils.config import ConfigError


def test_smoke_grids_cover_what_the_issue_asks():
    from normlab.studies.plan import plan_study

    specs = plan_study("rmt", "smoke")
    assert {s.mapping("options")["M"] for s in specs if s.task == RMT_TASK} == {1, 3, 5}
    jac = [s for s in specs if s.task == JACOBIAN_TASK]
    assert {s.init for s in jac} == {"xavier_normal", "kaiming_normal", "orthogonal",
                                     "delta_orthogonal"}
    assert {(s.model, s.norm) for s in jac} == {("mlp", "none"), ("mlp", "batch"),
                                                ("resnet", "none"), ("resnet", "batch")}
    init = plan_study("init", "smoke")
    assert {s.task for s in init} == {"train", JACOBIAN_TASK}
    assert {(s.norm, s.init) for s in init} >= {("none", "delta_orthogonal"),
                                                ("batch", "xavier_normal")}
    noise = plan_study("noise-scale", "smoke")
    assert {s.norm for s in noise if s.task == NOISE_TASK} <= {"none", "group", "layer"}
    assert len({s.batch_size for s in noise if s.task == "train"}) >= 3
    small = plan_study("small-batch", "smoke")
    assert {s.norm for s in small} == {"batch", "group", "layer", "instance", "batch_renorm"}
    assert min(s.batch_size for s in small) == 2 and max(s.batch_size for s in small) == 128
    assert {s.depth for s in plan_study("small-batch", "paper")} == {110}


def test_task_options_are_checked():
    with pytest.raises(ConfigError, match="'bogus'"):
        read_options(RunSpec(task=RMT_TASK, options={"bogus": 1}))
    with pytest.raises(ConfigError, match=r"options\.N"):
        read_options(RunSpec(task=RMT_TASK, options={"N": 0}))
    with pytest.raises(ConfigError, match=r"options\.examples"):
        read_options(RunSpec(task=JACOBIAN_TASK, norm="batch", options={"examples": 1}))
    with pytest.raises(ConfigError, match=r"options\.method") as err:
        read_options(RunSpec(task=JACOBIAN_TASK, norm="none",
                                     options={"method": "svd", "examples": 0}))
    assert len(err.value.problems) == 2  # every problem at once


def test_noise_task_refuses_batch_coupled_models():
    spec = RunSpec(task=NOISE_TASK, depth=8, width=4, norm="batch",
                   options={"examples": 8, "batch_sizes": [2]})
    with pytest.raises(ConfigError, match="'norm'"):
        get_task(NOISE_TASK)(spec, RunContext())


def test_rmt_task_records_the_product_spectrum():
    context = RunContext()
    result = get_task(RMT_TASK)(RunSpec(task=RMT_TASK, options={"M": 2, "N": 50}), context)
    assert result.status == "completed"
    values = [r for r in context.records if r["quantity"] == "singular_value"]
    assert len(values) == 50 and result.final["sv_edge_theory"] == pytest.approx(27 ** 0.5 / 2)


def test_a_chance_level_run_is_stable_but_does_not_train():
    runs = pd.DataFrame({"norm": ["a"] * 4, "lr": [0.01, 0.1, 1.0, 10.0],
                         "status": ["completed", "completed", "completed", "diverged"],
                         "test_acc": [0.5, 0.9, 0.1, None]})
    row = stable_and_trained(runs, ["norm"]).iloc[0]
    assert row["largest_trained_lr"] == 0.1 and row["largest_stable_lr"] == 1.0
    assert row["smallest_diverged_lr"] == 10.0


TINY = {
    "rmt": (rmt, rmt.SCALES["smoke"].replace(
        factors=(1, 3), matrix_size=60, mlp_depth=3, mlp_width=8, resnet_width=4, examples=2,
        inits=("xavier_normal", "orthogonal"))),
    "init": (init_study, init_study.SCALES["smoke"].replace(
        depths=(8,), width=4, lrs=(0.1,), steps=3, batch_size=16, examples=2,
        inits=("xavier_normal", "kaiming_normal", "delta_orthogonal"))),
    "noise-scale": (noise_scale, noise_scale.SCALES["smoke"].replace(
        width=4, noise_examples=16, noise_batches=(1, 4, 8), noise_samples=50,
        batch_sizes=(8, 32), lrs=(0.05, 0.5), epochs=0.1)),
    "small-batch": (small_batch, small_batch.SCALES["smoke"].replace(
        width=4, batch_sizes=(2, 16), lrs=(0.1,), epochs=0.01, norms=("batch", "group"))),
}
EXPECTED = {"rmt": ({"rmt_products", "rmt_conditioning", "jacobian_spectra"}, {"E9"}),
            "init": ({"init_signal_propagation", "init_jacobian", "init_stable_lr",
                      "init_accuracy"}, {"R7"}),
            "noise-scale": ({"sgd_noise_vs_batch", "accuracy_vs_noise_scale",
                             "stable_lr_vs_batch"}, {"E2", "R5"}),
            "small-batch": ({"small_batch_accuracy", "small_batch_stable_lr"}, {"R1"})}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_study_runs_and_writes_its_figures_and_findings(name, tmp_path, monkeypatch):
    from normlab.runner import run_study

    module, scale = TINY[name]
    monkeypatch.setitem(module.SCALES, "smoke", scale)
    results = run_study(name, tmp_path, "smoke", report=False)
    assert set(results.runs["status"]) <= {"completed", "diverged"}, results.runs["error"]
    study = get_study(name)
    figures = study.figures(results, tmp_path / "figures")
    names, experiments = EXPECTED[name]
    assert {f.name for f in figures} == names
    assert {f.experiment for f in figures} == experiments
    for figure in figures:
        assert "BN mode" in figure.caption
        assert all(path.exists() and path.stat().st_size > 0 for path in figure.files.values())
    findings = study.findings(results)
    assert findings and all(isinstance(f, Finding) for f in findings)
    assert {f.experiment for f in findings} <= experiments
    if name == "rmt":  # the paper's numbers beside ours
        edge = next(f for f in findings if "Largest singular value" in f.claim)
        assert edge.paper == "2.00, 3.08" and "closed form 2.000, 3.079" in edge.ours
