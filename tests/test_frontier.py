"""Divergence as a measured probability: perturbation replicates, the frontier bracket, the
follow-up rounds that replicate the points near it, and the tables and commands that show it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fake_frontier  # noqa: F401 (registers the "fake-frontier" study)
import fake_study  # noqa: F401 (registers the "fake" task)
from normlab.cli import main
from normlab.execute.preflight import plan_problems
from normlab.report.terminal import pack_size_note, summary_table
from normlab.runner import run_study
from normlab.runs.spec import RunSpec
from normlab.studies import get_study, list_studies, load_results
from normlab.studies._frontier import frontier_replicates, near_frontier, with_replicate
from normlab.studies._trains import (
    bracket,
    bracket_text,
    frontier_order,
    point_table,
    same_cell,
    stable_and_trained,
)
from normlab.studies.base import StudyResults
from normlab.studies.plan import follow_ups_so_far, plan_study, study_settings
from normlab.train.build import (
    REPLICATE_PERTURBATION,
    build_model,
    perturb_initial_weights,
    train_options,
)
from normlab.utils.config import ConfigError

RUN_IDS = Path(__file__).parent / "data" / "study_run_ids.json"


# -- run ids ---------------------------------------------------------------------------------------

def test_the_run_ids_of_every_study_at_every_scale_are_those_of_main():
    """Replicates live in the train task's options and are written only for r >= 1, so the
    ids (and folders) of every unperturbed run stay what they were before issue 18."""
    stored = json.loads(RUN_IDS.read_text())["run_ids"]
    builtin = {name for name in list_studies()
               if type(get_study(name)).__module__.startswith("normlab.")}
    assert builtin == set(stored)
    for name, scales in stored.items():
        for scale, ids in scales.items():
            assert [s.run_id for s in plan_study(name, scale)] == ids.split(), (name, scale)


def test_a_replicate_is_a_distinct_run_whose_unset_replicate_leaves_the_spec_unchanged():
    spec = RunSpec()
    assert "replicate" not in spec.mapping("options")
    ids = {spec.run_id, with_replicate(spec, 1).run_id, with_replicate(spec, 2).run_id}
    assert len(ids) == 3
    assert with_replicate(spec, 3).mapping("options") == {"replicate": 3}
    kept = RunSpec(options={"fused_sgd": True})
    assert with_replicate(kept, 1).mapping("options") == {"fused_sgd": True, "replicate": 1}


@pytest.mark.parametrize("value", [-1, 1.5, "2", True, 2**32])
def test_a_bad_replicate_is_refused_before_any_run(value, tmp_path):
    spec = RunSpec(options={"replicate": value})
    with pytest.raises(ConfigError, match=r"The 'options\.replicate' setting must be an int"):
        train_options(spec)
    assert any("options.replicate" in p for p in plan_problems([spec], tmp_path))


# -- the perturbation ------------------------------------------------------------------------------

def _model(spec: RunSpec) -> torch.nn.Module:
    from normlab.data import load

    train_set, _ = load("digits")
    return build_model(spec, train_set, torch.device("cpu"))


def test_a_replicate_starts_from_the_seeds_weights_perturbed_by_a_relative_1e7():
    spec = RunSpec(depth=8, width=8, norm="batch", init="xavier_normal")
    base = _model(spec)
    replica = _model(with_replicate(spec, 1))
    changed = 0
    for (name, w), (_, v) in zip(base.named_parameters(), replica.named_parameters(),
                                 strict=True):
        if not w.any():  # all-zero tensors (biases) stay zero
            assert not v.any(), name
            continue
        relative = ((v.double() - w.double()).norm() / w.double().norm()).item()
        assert relative < 3 * REPLICATE_PERTURBATION, name
        changed += relative > 0
        if w.numel() >= 500:  # enough entries for the norm to concentrate around 1e-7
            assert relative > 0.5 * REPLICATE_PERTURBATION, (name, relative)
    assert changed >= 5
    for (name, b), (_, c) in zip(base.named_buffers(), replica.named_buffers(), strict=True):
        assert torch.equal(b, c), name  # BN running statistics untouched


def test_the_perturbation_is_seeded_by_seed_and_replicate_and_drawn_in_float64():
    spec = RunSpec(depth=8, width=8, norm="batch", init="xavier_normal")
    one, again = _model(with_replicate(spec, 1)), _model(with_replicate(spec, 1))
    two = _model(with_replicate(spec, 2))
    other_seed = _model(with_replicate(spec.replace(seed=1), 1))
    pairs = list(zip(one.parameters(), again.parameters(), two.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert any(not torch.equal(a, c) for a, _, c in pairs)
    # ground truth: the formula drawn by hand, in float64, rounded once
    model = _model(spec)
    expected = []
    generator = torch.Generator().manual_seed(1 * 2**32 + 1)
    for w in model.parameters():
        exact = w.detach().double()
        z = torch.randn(exact.shape, generator=generator, dtype=torch.float64)
        expected.append((exact + REPLICATE_PERTURBATION * exact.square().mean().sqrt() * z).float())
    perturb_initial_weights(model, seed=1, replicate=1)
    assert all(torch.equal(w, e) for w, e in zip(model.parameters(), expected, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(one.parameters(), other_seed.parameters(),
                                                     strict=True))


def test_replicates_start_from_other_weights_but_see_the_same_batches():
    from normlab.train.loop import train

    spec = RunSpec(data="synthetic", data_options={"n_train": 64, "n_test": 32}, depth=8,
                   width=4, norm="batch", batch_size=16, steps=3, log_every=1, lr=0.01)
    base = train(spec)
    replicas = [train(with_replicate(spec, r)) for r in (1, 2, 3)]
    assert all(r.status == "completed" for r in [base, *replicas])
    # a few float32 ulps apart: one replicate's rounded test loss may equal the base's
    assert any(r.final["test_loss"] != base.final["test_loss"] for r in replicas)
    assert all(math.isclose(base.final["test_loss"], r.final["test_loss"], rel_tol=1e-4)
               for r in replicas)


# -- the bracket -----------------------------------------------------------------------------------

def _curve(outcomes: dict[float, str]) -> pd.DataFrame:
    """Runs of one norm: per lr a string of outcomes over seeds/replicates ("D" diverged)."""
    rows = [{"norm": "batch", "lr": lr, "seed": i, "status": "diverged" if c == "D" else
             "completed", "test_acc": np.nan if c == "D" else 0.9}
            for lr, cs in outcomes.items() for i, c in enumerate(cs)]
    return pd.DataFrame(rows)


def test_p_diverge_counts_seeds_and_replicates_and_leaves_out_unfinished_runs():
    runs = _curve({0.1: "...", 1.0: ".D.D", 10.0: "DD"})
    runs.loc[len(runs)] = {"norm": "batch", "lr": 1.0, "seed": 9, "status": "failed",
                           "test_acc": np.nan}
    table = point_table(runs, ["norm"]).set_index("lr")
    assert table["p_diverge"].to_dict() == {0.1: 0.0, 1.0: 0.5, 10.0: 1.0}
    assert table["runs"].to_dict() == {0.1: 3, 1.0: 4, 10.0: 2}
    assert table["trains"].to_dict() == {0.1: True, 1.0: False, 10.0: False}


@pytest.mark.parametrize("outcomes, low, high, edge", [
    ({0.1: "..", 1.0: "..", 10.0: "DD"}, 1.0, 10.0, 0),     # a clean step
    ({0.1: "..", 1.0: ".D", 10.0: "DD"}, 0.1, 10.0, 1),     # an edge point
    ({0.1: "..", 1.0: "..", 10.0: ".D"}, 1.0, math.nan, 1),  # never always diverged
    ({0.1: ".D", 1.0: "DD", 10.0: "DD"}, math.nan, 1.0, 1),  # even the smallest lr
    ({0.1: "..", 1.0: "DD", 10.0: ".."}, 0.1, 1.0, 0),      # stable again above: not counted
    ({0.1: "..", 1.0: "..", 10.0: ".."}, 10.0, math.nan, 0),  # censored
])
def test_the_bracket_is_the_largest_lr_stable_from_below_and_the_smallest_always_diverged(
        outcomes, low, high, edge):
    table = stable_and_trained(_curve(outcomes), ["norm"]).iloc[0]
    assert bracket(point_table(_curve(outcomes), ["norm"])) == pytest.approx(
        (low, high), nan_ok=True)
    assert table["largest_stable_lr"] == pytest.approx(low, nan_ok=True)
    assert table["smallest_always_diverged_lr"] == pytest.approx(high, nan_ok=True)
    assert table["edge_lrs"] == edge
    assert table["stable_censored"] == (low == 10.0)


def test_brackets_are_ordered_only_when_one_lies_wholly_above_the_other():
    def row(outcomes):
        return stable_and_trained(_curve(outcomes), ["norm"]).iloc[0]

    low = row({0.1: "..", 1.0: "DD", 10.0: "DD"})            # [0.1, 1]
    high = row({0.1: "..", 1.0: "..", 10.0: "DD"})           # [1, 10]
    wide = row({0.1: "..", 1.0: ".D", 10.0: "DD"})           # [0.1, 10]
    open_top = row({0.1: "..", 1.0: "..", 10.0: ".."})       # [10, > 10]
    assert frontier_order(high, low) == 1 and frontier_order(low, high) == -1
    assert frontier_order(wide, low) == 0 and frontier_order(high, wide) == 0
    assert frontier_order(open_top, high) == 1
    assert frontier_order(open_top, open_top) == 0  # neither frontier is reached
    assert frontier_order(low, low) == 0 and same_cell(low, low)
    assert not same_cell(wide, wide)  # an edge band: the frontiers could lie anywhere in it
    assert bracket_text(low) == "[0.1, 1]" and bracket_text(open_top) == "[10, > 10]"
    assert bracket_text(row({0.1: "D.", 1.0: "DD"})) == "[< 0.1, 1]"


# -- which points get replicates -------------------------------------------------------------------

@pytest.mark.parametrize("p, near", [
    ([0, 0, 0, 1], [1.0, 10.0]),                # the step and its two sides
    ([0, 0, 0.5, 1], [0.1, 1.0, 10.0]),         # an edge point and both neighbours
    ([0, 0, 0, 0], [10.0]),                     # never diverges: the top (p = 1 above the grid)
    ([1, 1, 1, 1], [0.01]),                     # always diverges: the bottom
    ([0, 1, 0, 1], [0.01, 0.1, 1.0, 10.0]),     # non-monotone: every change
    ([0, 0, np.nan, 1], [0.1, 10.0]),           # a point without results is left out
])
def test_points_within_one_grid_step_of_the_frontier(p, near):
    points = pd.DataFrame({"lr": [0.01, 0.1, 1.0, 10.0], "p_diverge": p})
    assert near_frontier(points) == near


def test_frontier_replicates_copy_every_seed_of_the_near_points_only():
    base = RunSpec(norm="batch", depth=8)
    planned = [base.replace(lr=lr, seed=seed) for lr in (0.1, 1.0, 10.0) for seed in (0, 1)]
    planned.append(base.replace(norm="none", lr=10.0))  # another curve, never diverged
    statuses = pd.Series({s.run_id: "diverged" if s.lr == 10 else "completed" for s in planned})
    statuses[planned[-1].run_id] = "completed"
    follow = frontier_replicates(planned, statuses, ["norm"], 2)
    got = {(s.norm, s.lr, s.seed, s.mapping("options")["replicate"]) for s in follow}
    assert got == {(n, lr, seed, r) for n, lr, seeds in (("batch", 1.0, (0, 1)),
                                                          ("batch", 10.0, (0, 1)),
                                                          ("none", 10.0, (0,)))
                   for seed in seeds for r in (1, 2)}
    assert frontier_replicates(planned, statuses, ["norm"], 0) == []
    only_bn = frontier_replicates(planned, statuses, ["norm"], 1, lambda s: s.norm == "batch")
    assert {s.norm for s in only_bn} == {"batch"}
    # replicates are never replicated again
    again = frontier_replicates(planned + follow, statuses, ["norm"], 2)
    assert {s.run_id for s in again} == {s.run_id for s in follow}


# -- rounds in run_study ---------------------------------------------------------------------------

def _executed(counter: Path) -> list[str]:
    return counter.read_text().split() if counter.exists() else []


def _counted(tmp_path: Path) -> tuple[dict, Path]:
    counter = tmp_path / "counter.txt"
    options = {"diverge_lr": 1.0, "edge_lr": 1.0, "counter": str(counter)}
    return {"options": json.dumps(options)}, counter


def test_run_study_adds_rounds_of_replicates_until_the_frontier_settles(tmp_path):
    overrides, counter = _counted(tmp_path)
    out = tmp_path / "study"
    results = run_study("fake-frontier", out, overrides=overrides, report=False)
    runs = results.runs
    replicated = runs.groupby("lr")["options.replicate"].apply(
        lambda r: sorted(r.fillna(0).astype(int)))
    # (1) 1 and 10 are near; (2) 1 turns out an edge point, so 0.1 joins; (3) settled
    assert replicated.to_dict() == {0.01: [0], 0.1: [0, 1, 2], 1.0: [0, 1, 2],
                                    10.0: [0, 1, 2]}
    plan = json.loads((out / "study.json").read_text())
    assert sorted(plan["run_ids"]) == sorted(runs["run_id"])
    edge = runs.set_index("lr")["edge"].groupby("lr").all()
    assert edge.to_dict() == {0.01: False, 0.1: False, 1.0: True, 10.0: False}
    assert runs.loc[runs["lr"] == 1.0, "p_diverge"].unique().tolist() == [pytest.approx(1 / 3)]
    # resumed: the same rounds, decided from the same results, run nothing again
    done = len(_executed(counter))
    again = run_study("fake-frontier", out, overrides=overrides, report=False)
    assert len(_executed(counter)) == done
    assert sorted(again.runs["run_id"]) == sorted(runs["run_id"])
    # the whole plan as the results decide it, without running
    first = plan_study("fake-frontier", overrides=overrides)
    whole = follow_ups_so_far(get_study("fake-frontier"), first, StudyResults.load(out), "smoke",
                              overrides)
    assert sorted(s.run_id for s in whole) == sorted(runs["run_id"])


def test_replicates_zero_runs_the_grid_once(tmp_path):
    overrides, _ = _counted(tmp_path)
    results = run_study("fake-frontier", tmp_path / "s", overrides={**overrides, "replicates": "0"},
                        report=False)
    assert len(results.runs) == 4


def test_the_rounds_work_with_a_process_pool(tmp_path):
    from normlab.execute.local import LocalExecutor

    overrides, _ = _counted(tmp_path)
    results = run_study("fake-frontier", tmp_path / "s", overrides=overrides, report=False,
                        executor=LocalExecutor(workers=2))
    assert len(results.runs) == 10 and set(results.runs["status"]) == {"completed", "diverged"}


def test_a_failed_run_is_not_retried_in_a_later_round(tmp_path):
    counter = tmp_path / "counter.txt"
    options = {"diverge_lr": 1.0, "edge_lr": 1.0, "counter": str(counter),
               "crash_unless": str(tmp_path / "absent")}
    results = run_study("fake-frontier", tmp_path / "s",
                        overrides={"options": json.dumps(options)}, report=False)
    assert set(results.runs["status"]) == {"failed"} and len(results.runs) == 4


@pytest.mark.parametrize("value, expected", [
    ("-1", "The 'replicates' setting must be an int in [0, inf); got -1."),
    ("2.5", "The 'replicates' setting must be an int in [0, inf); got 2.5."),
    ("many", "The 'replicates' setting must be an int in [0, inf); got 'many'."),
])
def test_a_bad_replicates_setting_is_refused_before_any_run(value, expected, tmp_path, capsys):
    code = main(["run", "fake-frontier", "--out", str(tmp_path / "s"), "--set",
                 f"replicates={value}"])
    assert code == 2
    assert f"normlab: error: {expected}" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_replicates_is_a_setting_of_the_studies_that_declare_it():
    assert study_settings(get_study("lr-sweep"), {"replicates": "3", "lr": "0.1"}) == (
        {"replicates": 3}, {"lr": "0.1"})
    with pytest.raises(ConfigError, match="Unknown setting 'replicates'; valid settings are "):
        plan_study("gradients", overrides={"replicates": "3"})
    with pytest.raises(ConfigError, match=r"Unknown setting 'replicate'; .* replicates, "):
        plan_study("lr-sweep", overrides={"replicate": "3"})
    paper = get_study("paper")
    assert set(paper.settings) == {"replicates"}
    assert len(plan_study("paper", overrides={"replicates": "1"})) == len(plan_study("paper"))


def test_dry_run_lists_the_replicates_the_results_decide_and_says_what_follows(tmp_path, capsys):
    overrides, _ = _counted(tmp_path)
    out = tmp_path / "s"
    argv = ["run", "fake-frontier", "--out", str(out), "--set",
            f"options={overrides['options']}", "--dry-run"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "4 runs planned" in text and "2 perturbation replicate(s) per seed" in text
    run_study("fake-frontier", out, overrides=overrides, report=False)
    assert main(argv) == 0
    assert "10 runs planned: 10 already done, 0 to run." in capsys.readouterr().out


# -- tables and show -------------------------------------------------------------------------------

def test_load_results_gives_each_run_its_points_p_diverge_edge_and_pack_size(tmp_path):
    overrides, _ = _counted(tmp_path)
    run_study("fake-frontier", tmp_path / "s", overrides=overrides, report=False)
    runs = load_results(tmp_path / "s")
    # the point is every setting but seed and replicate: another lr is another point
    assert runs.groupby("lr")["p_diverge"].nunique().eq(1).all()
    assert runs.set_index("run_id")["edge"].dtype == bool
    assert set(runs["pack_size"]) == {1}
    assert (runs["edge"] == ((runs["p_diverge"] > 0) & (runs["p_diverge"] < 1))).all()


def test_show_marks_edge_runs_and_says_when_pack_sizes_are_mixed(tmp_path, capsys):
    overrides, _ = _counted(tmp_path)
    out = tmp_path / "s"
    run_study("fake-frontier", out, overrides=overrides, report=False)
    assert main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    edge_lines = [line for line in text.splitlines() if line.endswith("edge  0.3333")]
    assert len(edge_lines) == 3  # the three runs at lr 1
    assert "edge: 3 run(s)" in text and "packs of different sizes" not in text
    runs = load_results(out).assign(pack_size=[1, 1, 8, 8, 8, 8, 8, 8, 8, 8])
    assert pack_size_note(runs).startswith(
        "note: these runs were trained in packs of different sizes (1: 2 runs, 8: 8 runs)")
    assert "packs of different sizes" in summary_table(runs)


def test_the_lr_sweep_replicates_its_sweep_and_e10_curves_only():
    study = get_study("lr-sweep")
    planned = plan_study(study, "smoke")
    statuses = pd.Series({s.run_id: "diverged" if s.lr >= 10 else "completed" for s in planned})
    runs = pd.DataFrame({"run_id": statuses.index, "status": statuses.to_numpy()})
    follow = study.follow_ups(planned, StudyResults(Path("."), runs), "smoke", {})
    assert {s.group for s in follow} == {"sweep", "E10"}
    assert {s.lr for s in follow} == {3.0, 10.0}  # one grid step either side of the frontier
    curves = {(s.group, s.norm, s.depth) for s in follow}
    assert len(follow) == len(curves) * 2 * 3  # two points, 3 replicates (smoke), one seed
    assert len(study.follow_ups(planned, StudyResults(Path("."), runs), "smoke",
                                {"replicates": 1})) == len(curves) * 2


# -- the packed path decides divergence as the solo path does --------------------------------------

def test_a_diverged_members_weights_do_not_reach_the_others_before_its_read_back():
    """A member that diverges at step 1 keeps stepping (with non-finite weights) until the
    losses are read back (here at step 30, one window); the other member still follows its solo
    run to float reassociation, so a pack cannot decide a member's divergence for it."""
    from normlab.runs.tasks import RunContext
    from normlab.train.loop import train
    from normlab.train.packed import train_packed

    base = RunSpec(data="synthetic", data_options={"n_train": 512, "n_test": 64}, depth=8,
                   width=4, norm="batch", batch_size=16, steps=30, log_every=1,
                   schedule="constant", init="xavier_normal")
    specs = [base.replace(lr=0.05, seed=1), base.replace(lr=1e4, seed=2)]
    contexts = [RunContext(run_id=s.run_id) for s in specs]
    packed = train_packed(specs, contexts=contexts)
    assert [r.status for r in packed] == ["completed", "diverged"]
    assert packed[1].diverged_step == 1
    solo_context = RunContext(run_id=specs[0].run_id)
    solo = train(specs[0], context=solo_context)
    losses = [(a["loss"], b["loss"]) for a, b in zip(contexts[0].metrics, solo_context.metrics,
                                                     strict=True) if "loss" in a]
    assert len(losses) == 30
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in losses)
    assert math.isclose(packed[0].final["test_loss"], solo.final["test_loss"], rel_tol=1e-5)


# -- verdicts and the figure read the brackets -----------------------------------------------------

def _small_batch(outcomes: dict[tuple[str, int], dict[float, str]]) -> pd.DataFrame:
    rows = [{"run_id": f"{norm}-{batch}-{lr}-{i}", "group": "R1", "norm": norm,
             "batch_size": batch, "lr": lr, "seed": i,
             "status": "diverged" if c == "D" else "completed",
             "test_acc": np.nan if c == "D" else 0.9}
            for (norm, batch), curve in outcomes.items() for lr, cs in curve.items()
            for i, c in enumerate(cs)]
    return pd.DataFrame(rows)


SMALL_BATCH_R1 = ("LayerNorm, GroupNorm, InstanceNorm and Batch Renormalization allow learning "
                  "rates as large as BN's (the paper's divergence criterion)")


@pytest.mark.parametrize("group_curve, verdict, reason", [
    ({0.1: "..", 1.0: "DD"}, "agrees", ""),                       # the same grid step
    ({0.1: "..", 1.0: ".."}, "agrees", ""),                       # above BN's
    ({0.1: "DD", 1.0: "DD"}, "differs", "below BN's frontier: group at batch 8"),
    ({0.1: "..", 1.0: ".D"}, "not testable at this scale", "overlap"),
])
def test_small_batch_r1_reads_the_brackets_at_each_batch_size(group_curve, verdict, reason,
                                                              tmp_path):
    runs = _small_batch({("batch", 8): {0.1: "..", 1.0: "DD"}, ("group", 8): group_curve})
    findings = get_study("small-batch").findings(StudyResults(tmp_path, runs))
    found = next(f for f in findings if f.claim == SMALL_BATCH_R1)
    assert found.verdict == verdict and reason in found.reason
    assert "frontier brackets per batch size: 8: batch [0.1, 1]" in found.ours


def test_the_divergence_figure_draws_p_per_norm_with_its_bracket(tmp_path):
    from normlab.studies._lr_sweep_figures import divergence_vs_lr

    runs = pd.concat([_curve({0.1: "...", 1.0: ".D.", 10.0: "DDD"}).assign(norm="batch"),
                      _curve({0.1: "...", 1.0: "DDD", 10.0: "DDD"}).assign(norm="none")])
    runs = runs.assign(group="sweep", depth=20, data="digits", width=8, batch_size=64,
                       init="xavier_normal", run_id=[f"r{i}" for i in range(len(runs))])
    figure = divergence_vs_lr(StudyResults(tmp_path, runs), tmp_path / "figures")
    assert {p.suffix for p in figure.files.values()} == {".png", ".pdf", ".csv"}
    data = pd.read_csv(figure.files["csv"]).set_index(["norm", "lr"])
    assert data.loc[("batch", 1.0), "p_diverge"] == pytest.approx(1 / 3)
    assert data.loc[("batch", 1.0), ["bracket_low", "bracket_high"]].tolist() == [0.1, 10.0]
    assert data.loc[("none", 0.1), ["bracket_low", "bracket_high"]].tolist() == [0.1, 1.0]
    assert "replicates" in figure.caption and "bracket" in figure.caption


# -- issue 18's criterion: the main job's findings do not depend on the pack size ----------------

@pytest.mark.slow
def test_the_smoke_lr_sweep_is_the_same_bit_for_bit_alone_and_in_packs_of_8(tmp_path):
    """`normlab run lr-sweep` at smoke scale (40 steps per run, the budget the issue measured
    its flips at) with --pack 1 in this process and --pack 8 in two worker processes: on a CPU
    every run's metric rows, probe records and result are the same bits
    (normlab.train.invariance), so the verdicts and brackets are identical and no run changes
    status (issue 18: every run that does must be an edge run in both folders; none does).
    `benchmarks/frontier.py` measures the same at the full budget, with the times."""
    from normlab.execute.local import LocalExecutor
    from normlab.studies._compare import flipped_runs, paired_runs, same_brackets, verdicts
    from normlab.studies._lr_sweep_figures import divergence_table

    study = get_study("lr-sweep")
    folders = {1: tmp_path / "pack1", 8: tmp_path / "pack8"}
    results = [run_study(study, folders[k], overrides={"steps": "40"}, report=False,
                         executor=LocalExecutor(pack=k, workers=1 if k == 1 else 2))
               for k in folders]
    assert verdicts(study.findings(results[0])) == verdicts(study.findings(results[1]))
    assert same_brackets(*(divergence_table(r) for r in results), ["depth", "norm"])
    runs = [load_results(folders[k]) for k in folders]
    assert runs[0]["run_id"].is_unique and set(runs[0]["run_id"]) == set(runs[1]["run_id"])
    assert len(runs[0]) >= 100 and runs[0]["edge"].any()  # the grid and its replicates
    assert sorted(runs[0]["pack_size"].unique()) == [1]
    assert runs[1]["pack_size"].max() > 1
    pairs = paired_runs(*runs)
    flipped = flipped_runs(pairs)
    assert flipped.empty, flipped[["norm", "depth", "lr", "options.replicate"]]
    for run_id in runs[0]["run_id"]:
        alone, packed = (folders[k] / "runs" / run_id for k in folders)
        for name in ("metrics.jsonl", "records.jsonl"):
            assert _read(alone / name) == _read(packed / name), (run_id, name)
        results_alone, results_packed = (json.loads(_read(d / "result.json") or "{}")
                                         for d in (alone, packed))
        for key in ("status", "steps", "final", "diverged_step", "diverged_loss"):
            assert results_alone[key] == results_packed[key], (run_id, key)


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None


# -- comparing two folders of one plan ------------------------------------------------------------

def test_paired_divergence_counts_and_tests_against_the_binomial_by_hand():
    from normlab.studies._compare import (
        PairedDivergence,
        flipped_runs,
        paired_divergence,
        paired_runs,
    )

    statuses_a = ["diverged"] * 6 + ["completed"] * 12 + ["failed"]
    statuses_b = ["diverged"] * 4 + ["completed"] * 2 + ["diverged"] * 1 + ["completed"] * 11 \
        + ["completed"]
    ids = [f"r{i}" for i in range(len(statuses_a))]
    a = pd.DataFrame({"run_id": ids, "lr": 1.0, "status": statuses_a, "p_diverge": 0.3,
                      "edge": True})
    b = a.assign(status=statuses_b)
    pairs = paired_runs(a, b)
    assert len(pairs) == 18  # the failed run is left out
    assert len(flipped_runs(pairs)) == 3
    counts = paired_divergence(pairs)
    assert (counts.runs, counts.diverged_a, counts.diverged_b, counts.only_a, counts.only_b) == \
        (18, 6, 5, 2, 1)
    assert counts.difference == pytest.approx(-1 / 18)
    # McNemar's exact test by hand: 3 discordant runs split 2:1, two-sided under Bin(3, 1/2)
    by_hand = min(1.0, 2 * sum(math.comb(3, k) for k in range(0, 2)) / 2**3)
    assert counts.p_value == pytest.approx(by_hand)
    low, high = counts.interval
    half = 1.959963984540054 * math.sqrt((3 / 18 - (1 / 18) ** 2) / 18)
    assert (low, high) == pytest.approx((-1 / 18 - half, -1 / 18 + half))
    uneven = PairedDivergence(runs=20, diverged_a=10, diverged_b=4, only_a=7, only_b=1)
    assert uneven.p_value == pytest.approx(2 * (math.comb(8, 0) + math.comb(8, 1)) / 2**8)


def test_same_brackets_compares_every_curve_with_nan_ends():
    from normlab.studies._compare import brackets_overlap, same_brackets, within_bracket

    table = pd.DataFrame({"norm": ["a", "a", "b"], "lr": [1.0, 10.0, 1.0],
                          "largest_stable_lr": [1.0, 1.0, np.nan],
                          "smallest_always_diverged_lr": [np.nan, np.nan, 1.0]})
    assert same_brackets(table, table.copy(), ["norm"])
    moved = table.assign(largest_stable_lr=[1.0, 1.0, 0.1])
    assert not same_brackets(table, moved, ["norm"])
    assert not same_brackets(table, table[table["norm"] == "a"], ["norm"])
    # a: [1, open], b: [open, 1]; moved: a as before, b [0.1, 1]
    assert brackets_overlap(table, moved, ["norm"])
    apart = table.assign(largest_stable_lr=[3.0, 3.0, np.nan],
                         smallest_always_diverged_lr=[10.0, 10.0, 1.0])
    assert brackets_overlap(table, apart, ["norm"])  # a: [1, open] meets [3, 10]
    assert not brackets_overlap(moved.assign(smallest_always_diverged_lr=[2.0, 2.0, 1.0]),
                                apart, ["norm"])  # a: [1, 2] misses [3, 10]
    runs = pd.DataFrame({"norm": ["a", "a", "a", "b", "c"], "lr": [0.5, 1.0, 30.0, 1.0, 1.0]})
    assert within_bracket(runs, apart, ["norm"]).tolist() == [False, False, False, True, False]
    assert within_bracket(runs, table, ["norm"]).tolist() == [False, True, True, True, False]


def test_the_paper_study_runs_and_shares_its_members_follow_ups(tmp_path, monkeypatch):
    from normlab.studies import paper

    monkeypatch.setattr(paper, "MEMBERS", ("fake-frontier", "fake"))
    study = get_study("paper")
    assert set(study.settings) == {"replicates"}
    results = run_study(study, tmp_path / "s", overrides={"replicates": "1"}, report=False)
    shares = {member.name: share for member, share in study._shares(results)}
    assert len(shares["fake"].runs) == 3  # fake takes no replicates: it is asked without them
    replicated = shares["fake-frontier"].runs["options.replicate"].fillna(0)
    assert len(replicated) == 4 + 3 and set(replicated) == {0, 1}
    assert "fake-frontier: 1 perturbation replicate(s)" in study.follow_up_note("smoke",
                                                                               {"replicates": 1})


def test_a_bad_replicates_is_reported_with_the_other_problems(tmp_path, capsys):
    code = main(["run", "lr-sweep", "--out", str(tmp_path / "s"), "--set", "replicates=-3",
                 "--set", "lr=x", "--workers", "0"])
    assert code == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == ["normlab: error: The '--workers' setting must be an int in [1, inf); got 0.",
                      "normlab: error: The 'replicates' setting must be an int in [0, inf); "
                      "got -3.",
                      "normlab: error: The 'lr' setting must be a float in (0, inf); got 'x'."]
