"""Packed training against the plain path: each member of a pack is the same run as alone.

Ground truth is `normlab.train.train(spec)` run solo for every member: per-step losses and
accuracies, eval rows, divergence step, final metrics, running statistics, probe records and
what per-member callbacks see (including their global-RNG draws) must agree up to float
reassociation (grouped instead of single convolutions; fused multiply-adds in SGD).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from normlab.execute.local import LocalExecutor
from normlab.execute.packing import pack_specs
from normlab.execute.throughput import (
    default_pack,
    default_parallelism,
    default_workers,
    images_per_s,
    plan_estimate,
    throughput_table,
    typical_spec,
    with_measured_rows,
)
from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore, file_fingerprint, read_jsonl, read_result
from normlab.runs.tasks import RunContext, execute_run
from normlab.runs.verify import verify_store
from normlab.train import TrainState, list_callbacks, register_callback, train
from normlab.train.invariance import CPU_MIN_STACK, stack_rows
from normlab.train.packed import (
    BATCHING_RULE_WARNING,
    check_packable,
    execute_pack,
    train_packed,
)
from normlab.utils.config import ConfigError
from normlab.utils.silence import silenced

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

NORMS = ("batch", "batch_renorm", "group", "layer", "instance", "none")
NORM_OPTIONS: dict[str, dict[str, Any]] = {
    "group": {"groups": 4},  # 2 channels a group: no group straddles anything but a member
    "batch_renorm": {"renorm_warmup": [0.0, 0.5]},  # r/d limits relax inside the test's steps
}
RTOL, ATOL = 1e-4, 1e-5


def base_spec(norm: str = "batch", **changes: Any) -> RunSpec:
    """A tiny run: 3 steps an epoch on synthetic 1x8x8 images, 8 steps (3 evaluations)."""
    spec = RunSpec(data="synthetic", data_options={"n_train": 96, "n_test": 64,
                                                   "shape": [1, 8, 8]},
                   depth=8, width=8, norm=norm, norm_options=NORM_OPTIONS.get(norm, {}),
                   batch_size=32, steps=8, log_every=1, device="cpu", lr=0.05)
    return spec.replace(**changes)


def three_members(norm: str) -> list[RunSpec]:
    """Members that differ in lr, seed, init and gain, momentum, Nesterov, weight decay,
    schedule and update projection."""
    base = base_spec(norm)
    return [base.replace(seed=1),
            base.replace(seed=2, lr=0.02, init="xavier_normal", init_gain=1.3, momentum=0.0,
                         weight_decay=0.0),
            base.replace(seed=3, lr=0.03, nesterov=True, schedule="cosine",
                         update_projection="tangential")]


class Recorder:
    """A per-member callback: what it saw at each call, and one global-RNG draw."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.model: torch.nn.Module | None = None

    def __call__(self, state: TrainState) -> None:
        self.model = state.model
        self.calls.append({
            "step": state.step, "loss": state.loss, "lr": state.lr,
            "x_sum": float(state.x.sum()), "y": state.y.tolist(),
            "rng": float(torch.rand(())),  # consumed, as a probe without hygiene would
            "buffers": {n: b.clone() for n, b in state.model.named_buffers()},
            "params": {n: p.detach().clone() for n, p in state.model.named_parameters()},
        })


def assert_close(a: Any, b: Any, where: str) -> None:
    """Equal structure; floats and tensors equal up to reassociation."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_close(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0  # rounding ~ magnitude
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * scale, msg=where)
    elif isinstance(a, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_solo(spec: RunSpec) -> tuple[Any, RunContext, Recorder]:
    context, recorder = RunContext(run_id=spec.run_id), Recorder()
    return train(spec, callbacks=[recorder], context=context), context, recorder


def run_pack(specs: list[RunSpec]) -> tuple[list[Any], list[RunContext], list[Recorder]]:
    contexts = [RunContext(run_id=s.run_id) for s in specs]
    recorders = [Recorder() for _ in specs]
    results = train_packed(specs, callbacks=[[r] for r in recorders], contexts=contexts)
    return results, contexts, recorders


def assert_member_equals_solo(spec: RunSpec, packed: tuple, solo: tuple) -> None:
    (result, context, recorder), (result0, context0, recorder0) = packed, solo
    where = f"{spec.norm} seed {spec.seed}"
    assert (result.status, result.steps, result.diverged_step) == \
        (result0.status, result0.steps, result0.diverged_step), where
    assert_close(result.final, result0.final, f"{where} final")
    assert_close(context.metrics, context0.metrics, f"{where} metrics")
    assert_close(context.records, context0.records, f"{where} records")
    assert_close(recorder.calls, recorder0.calls, f"{where} callbacks")
    assert result.provenance["run_id"] == spec.run_id


@pytest.mark.parametrize("norm", [
    "batch", *[pytest.param(n, marks=pytest.mark.slow) for n in NORMS if n != "batch"]])
def test_each_member_equals_its_solo_run(norm):
    specs = [s.replace(probes=[{"name": "activation_stats", "every": 4}])
             for s in three_members(norm)]
    packed = run_pack(specs)
    for k, spec in enumerate(specs):
        assert_member_equals_solo(spec, tuple(p[k] for p in packed), run_solo(spec))
    calls = packed[2][0].calls
    assert [c["step"] for c in calls] == list(range(9))  # step 0 and after each of 8 steps
    assert len({c["rng"] for c in calls}) == len(calls)  # the member's RNG stream advances
    if norm in ("batch", "batch_renorm"):  # running statistics moved, per member
        first, last = calls[0]["buffers"], calls[-1]["buffers"]
        assert not torch.equal(first["stem.norm.running_mean"], last["stem.norm.running_mean"])


@pytest.mark.slow
def test_a_diverging_member_is_recorded_as_alone_and_masked():
    base = base_spec("none", steps=10)
    specs = [base.replace(seed=1), base.replace(seed=2, lr=40.0), base.replace(seed=3, lr=0.02)]
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    contexts = [RunContext(run_id=s.run_id) for s in specs]
    recorders = [Recorder() for _ in specs]

    def on_done(k: int, result: Any) -> None:
        model = recorders[k].model
        snapshots[k] = {n: p.detach().clone() for n, p in model.named_parameters()}

    results = train_packed(specs, callbacks=[[r] for r in recorders], contexts=contexts,
                           on_done=on_done)
    solo = [run_solo(s) for s in specs]
    assert solo[1][0].status == "diverged" and results[1].status == "diverged"
    assert results[1].diverged_step < 9  # it stopped while the others went on
    for k, spec in enumerate(specs):
        assert_member_equals_solo(spec, (results[k], contexts[k], recorders[k]), solo[k])
    masked = recorders[1].model
    for name, p in masked.named_parameters():  # no update after its divergence
        assert torch.equal(p.detach(), snapshots[1][name]) or p.detach().isnan().any(), name


@pytest.mark.slow
def test_the_pack_shrinks_when_most_members_stopped():
    base = base_spec("batch", steps=10)
    specs = [base.replace(seed=1, lr=0.05), base.replace(seed=2, lr=3e3),
             base.replace(seed=3, lr=5e3)]
    packed = run_pack(specs)
    solo = [run_solo(s) for s in specs]
    assert [r.status for r in packed[0]] == ["completed", "diverged", "diverged"]
    for k, spec in enumerate(specs):
        assert_member_equals_solo(spec, tuple(p[k] for p in packed), solo[k])
    survivor = packed[2][0].model
    weight = next(survivor.parameters())
    stored = weight.untyped_storage().nbytes() // weight.element_size()
    rows = stack_rows(torch.device("cpu"), 1)  # one member and its ghost rows (invariance)
    assert stored == rows * sum(p.numel() for p in survivor.parameters())


# -- store, executor, resume --------------------------------------------------------------------

@register_callback("interrupt_once", overwrite="interrupt_once" in list_callbacks())
def _interrupt_once(at: int = 0, flag: str = ""):
    """Raise KeyboardInterrupt at step `at` if the file `flag` exists (and remove it)."""

    def callback(state: TrainState) -> None:
        if state.step == at and Path(flag).exists():
            Path(flag).unlink()
            raise KeyboardInterrupt

    return callback


def test_members_are_stored_as_solo_runs(tmp_path):
    specs = three_members("batch")[:2]
    execute_pack(specs, tmp_path / "packed")
    for spec in specs:
        execute_run(spec, tmp_path / "solo")
        packed_dir, solo_dir = (RunStore(tmp_path / name).run_dir(spec)
                                for name in ("packed", "solo"))
        assert sorted(p.name for p in packed_dir.iterdir()) == \
            sorted(p.name for p in solo_dir.iterdir())
        assert json.loads((packed_dir / "spec.json").read_text()) == spec.to_dict()
        assert_close(read_jsonl(packed_dir / "metrics.jsonl"),
                     read_jsonl(solo_dir / "metrics.jsonl"), "metrics.jsonl")
        packed_result, solo_result = (read_result(d / "result.json")
                                      for d in (packed_dir, solo_dir))
        assert packed_result.status == solo_result.status == "completed"
        assert_close(packed_result.final, solo_result.final, "final")
        assert packed_result.provenance["pack_size"] == 2
        recorded = json.loads((packed_dir / "result.json").read_text())["files"]
        assert recorded["metrics.jsonl"] == file_fingerprint(packed_dir / "metrics.jsonl")
        assert len(recorded["metrics.jsonl"]["sha256"]) == 64  # so verify sees a changed digit
    assert verify_store(tmp_path / "packed") == []


@pytest.mark.slow
def test_an_interrupted_pack_resumes_per_member(tmp_path):
    flag = tmp_path / "interrupt"
    flag.touch()
    base = base_spec("batch", steps=10)
    specs = [base.replace(seed=1, probes=[{"name": "interrupt_once", "at": 6,
                                           "flag": str(flag)}]),
             base.replace(seed=2, lr=5e3), base.replace(seed=3, lr=0.02)]
    store = RunStore(tmp_path)
    executor = LocalExecutor(pack=3)
    with pytest.raises(KeyboardInterrupt):
        list(executor.run(specs, tmp_path))
    assert [store.is_done(s) for s in specs] == [False, True, False]  # diverged early: kept
    kept = (store.run_dir(specs[1]) / "result.json").read_text()
    todo = [s for s in specs if not store.is_done(s)]
    finished = dict(executor.run(todo, tmp_path))
    assert [store.is_done(s) for s in specs] == [True, True, True]
    assert (store.run_dir(specs[1]) / "result.json").read_text() == kept
    for spec in todo:
        solo = train(spec)
        assert_close(finished[spec].final, solo.final, "final")


def test_the_executor_runs_unpackable_specs_alone(tmp_path):
    import fake_study  # noqa: F401  (registers the "fake" task, as the other tests import it)

    specs = [RunSpec(task="fake", lr=lr, seed=0) for lr in (0.01, 0.1)]
    ran = dict(LocalExecutor(pack=4).run(specs, tmp_path))
    assert set(ran) == set(specs) and all(r.status == "completed" for r in ran.values())


# -- grouping and defaults ----------------------------------------------------------------------

def test_pack_specs_groups_compatible_runs_in_plan_order():
    a = [base_spec("batch", seed=s) for s in range(5)]
    b = [base_spec("none", seed=s) for s in range(2)]
    alone = base_spec("batch", compile=True)
    plan = [a[0], b[0], a[1], alone, a[2], b[1], a[3], a[4]]
    assert pack_specs(plan, 3) == [[a[0], a[1], a[2]], [b[0], b[1]], [alone], [a[3], a[4]]]
    assert pack_specs(plan, 1) == [[s] for s in plan]
    import fake_study  # noqa: F401  (registers the "fake" task, as the other tests import it)

    fake = [RunSpec(task="fake", seed=s) for s in range(2)]
    assert pack_specs(fake, 4) == [[fake[0]], [fake[1]]]


def test_bad_pack_settings_are_refused():
    with pytest.raises(ConfigError, match="'pack' setting"):
        pack_specs([base_spec()], 0)
    with pytest.raises(ConfigError, match="share the settings"):
        check_packable([base_spec(batch_size=32), base_spec(batch_size=16)])
    with pytest.raises(ConfigError, match="cannot be packed"):
        check_packable([base_spec(channels_last=True)])


CIFAR = {"width": 16, "pixels": 3 * 32 * 32}
TINY = {"width": 8, "pixels": 1 * 8 * 8}  # base_spec's workload: synthetic 1x8x8, width 8


def table_row(images_per_s: float, pack: int = 1, **fields: Any) -> dict[str, Any]:
    """A throughput-table row: ResNet-20, BN, CIFAR-sized, batch 128, packed, on "GPU-X"."""
    return {"device_kind": "cuda", "device": "GPU-X", "model": "resnet", "depth": 20, **CIFAR,
            "norm": "batch", "batch_size": 128, "kind": "packed", "pack": pack,
            "images_per_s": images_per_s, **fields}


def use_table(monkeypatch, rows: list[dict[str, Any]]) -> None:
    monkeypatch.setattr("normlab.execute.throughput.throughput_table", lambda: rows)


def test_default_pack_is_the_measured_best_or_off(monkeypatch):
    table = [table_row(v, k) for k, v in {1: 100.0, 4: 300.0, 8: 420.0, 16: 400.0}.items()]
    table += [table_row(v, k, device_kind="mps") for k, v in {1: 100.0, 2: 103.0, 4: 90.0}.items()]
    table += [table_row(v, k, device_kind="cpu") for k, v in {1: 100.0, 2: 103.0, 4: 90.0}.items()]
    # rows at another batch size do not set the default (the best there is 16)
    table += [table_row(v, k, batch_size=8) for k, v in {1: 10.0, 16: 100.0}.items()]
    use_table(monkeypatch, table)
    assert default_pack("cuda") == 8
    assert default_pack("mps") == 1  # 3 % faster is within noise: off
    assert default_pack("cpu") == CPU_MIN_STACK  # a lone CPU run stacks that many anyway
    use_table(monkeypatch, [*table, table_row(80.0, device_kind="mps", kind="solo")])
    assert default_pack("mps") == 2  # compared with the solo run's 80 images/s


def test_the_defaults_follow_the_plans_workload(monkeypatch):
    """A plan of tiny runs reads the tiny rows (the nearest width and pixels), a CIFAR plan the
    CIFAR rows. On a CPU a lone run stacks CPU_MIN_STACK models anyway (train/invariance.py),
    so the default is the best pack of at least that many, even where packing measured slower
    than the plain loop."""
    cpu = {"device_kind": "cpu", "depth": 8, "batch_size": 32}
    use_table(monkeypatch, [
        table_row(100.0, 1, **cpu), table_row(80.0, 4, **cpu),  # CIFAR-sized: slower packed
        table_row(60.0, 8, **cpu),
        table_row(1000.0, 1, **cpu, **TINY), table_row(1400.0, 4, **cpu, **TINY),
        table_row(1900.0, 8, **cpu, **TINY)])
    tiny = [base_spec(seed=s) for s in range(5)]
    cifar = [s.replace(data="cifar10", data_options={}, width=16) for s in tiny]
    assert CPU_MIN_STACK == 4
    assert default_pack("cpu", tiny[0]) == 8 and default_pack("cpu", cifar[0]) == 4
    assert default_pack("cpu") == 4  # no plan: ResNet-20 on CIFAR-sized images
    # the plan's largest group of packable runs decides; a lone other run does not
    plan = [cifar[0], *tiny]
    assert typical_spec(plan) == tiny[0] and typical_spec([]) is None
    # workers: one per core, no more than the plan's packs (the CIFAR run, the five tiny ones)
    assert default_parallelism(None, None, "cpu", plan) == (8, min(default_workers("cpu"), 2))
    assert default_parallelism(None, None, "cpu", cifar) == (4, min(default_workers("cpu"), 2))
    assert "estimate on cpu (packs of at most 8): " in plan_estimate(plan, 1, fixed=False)


def test_a_new_measurement_replaces_the_same_configuration_on_the_same_device_kind():
    old = [table_row(100.0, 8, device="H200 (diagnostic)"),
           table_row(120.0, 16, device="H200 (diagnostic)"),
           table_row(5.0, 8, device="CPU", device_kind="cpu"),
           table_row(30.0, 8, device="H200 (diagnostic)", batch_size=8),
           table_row(50.0, 8, device="H200 (diagnostic)", **TINY)]
    new = [table_row(90.0, 8, device="NVIDIA H100")]
    # the diagnostic's K = 8 row at batch 128 on CIFAR-sized images goes, whatever the device's
    # name; nothing else
    assert with_measured_rows(old, new) == [*old[1:], new[0]]


def test_the_shipped_table_names_its_devices_and_sets_the_defaults():
    table = throughput_table()
    assert table and all(r["device"] and r["images_per_s"] > 0 for r in table)
    assert all(r["width"] > 0 and r["pixels"] > 0 for r in table)
    assert default_workers("cpu") == len(os.sched_getaffinity(0))  # a CPU pack: one thread
    processes = {r["pack"]: r["images_per_s"] for r in table
                 if r["device_kind"] == "cuda" and r["kind"] == "processes"}
    assert default_workers("cuda", devices=2) == 2 * max(processes, key=processes.get)


def test_the_dry_run_estimate_counts_training_images():
    specs = [base_spec(seed=s) for s in range(3)] + [base_spec(seed=9, steps=4)]
    text = plan_estimate(specs, 2)
    assert "3 packs of at most 2 runs" in text
    assert f"training images in the plan: {(3 * 8 + 4) * 32:,}" in text


def test_the_dry_run_estimate_is_images_over_the_measured_rate_of_each_pack(monkeypatch):
    use_table(monkeypatch, [table_row(v, k, depth=8)
                            for k, v in {1: 100.0, 2: 150.0, 4: 240.0}.items()])
    specs = [base_spec(seed=s, steps=900, batch_size=128) for s in range(4)]  # 900 x 128 each
    images = 4 * 900 * 128
    # --pack 2: two packs of 2 at 150 images/s
    assert f"estimate on cuda (packs of at most 2): {images / 150 / 3600:.2f} device-hours" \
        in plan_estimate(specs, 2)
    # no --pack: the device's own default, the best measured pack (4 at 240 images/s)
    assert f"estimate on cuda (packs of at most 4): {images / 240 / 3600:.2f} device-hours" \
        in plan_estimate(specs, 1, fixed=False)
    short = [s.replace(steps=100) for s in specs]  # under 6 minutes: in minutes
    assert f"estimate on cuda (packs of at most 4): {images / 9 / 240 / 60:.1f} device-minutes" \
        in plan_estimate(short, 1, fixed=False)


def test_unmeasured_batch_sizes_are_bounded_by_the_next_larger_measured_one(monkeypatch):
    """A step on fewer images takes no longer: batch b < measured B counts B's step time, i.e.
    B's images/s x b / B; above every measured batch size the largest one's images/s."""
    use_table(monkeypatch, [table_row(v, depth=8, batch_size=b)
                            for b, v in {16: 400.0, 64: 1000.0}.items()])

    def rate(batch: int) -> float:
        got = images_per_s(base_spec(batch_size=batch), "cuda", 1)
        assert got is not None and got.device == "GPU-X"
        return got.images_per_s

    assert rate(16) == 400.0 and rate(64) == 1000.0  # measured: as recorded
    assert rate(4) == pytest.approx(400.0 * 4 / 16)  # bounded by batch 16's step time
    assert rate(32) == pytest.approx(1000.0 * 32 / 64)  # by batch 64's, the next larger
    assert rate(256) == 1000.0  # above: the largest measured batch's images/s
    specs = [base_spec(batch_size=4, steps=900)]
    text = plan_estimate(specs, 1)
    assert f"(packs of at most 1): at most {900 * 4 / 100.0 / 60:.1f} device-minutes" in text
    assert "batch sizes 4 not measured: each counted at the step time of the next larger" in text
    measured = plan_estimate([base_spec(batch_size=16, steps=900)], 1)
    assert "): at most" not in measured and "not measured" not in measured
    above = plan_estimate([base_spec(batch_size=256, steps=900)], 1)
    assert "batch sizes 256 not measured: counted at the images/s of the largest" in above


def test_cli_pack_option(tmp_path, capsys):
    from normlab.cli import main

    assert main(["run", "lr-sweep", "--out", str(tmp_path), "--pack", "0"]) == 2
    assert "'--pack' setting must be" in capsys.readouterr().err
    assert main(["run", "lr-sweep", "--out", str(tmp_path), "--pack", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "packs of at most 4 runs (--pack 4)" in out and "training images in the plan" in out


def test_the_defaults_follow_the_device_the_runs_will_use(monkeypatch):
    """Without --device, the runs' "auto" honours $NORMLAB_DEVICE, and so do the defaults."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("NORMLAB_DEVICE", "cpu")
    assert default_parallelism(None, None, None) == (default_pack("cpu"), default_workers("cpu"))
    monkeypatch.delenv("NORMLAB_DEVICE")
    assert default_parallelism(None, None, None) == (default_pack("cuda"),
                                                     default_workers("cuda"))
    assert default_parallelism(None, None, "cuda:0")[0] == default_pack("cuda")


def test_a_batch_renorm_pack_trains_without_torch_s_batching_rule_warning():
    """BatchRenorm's in-place lerp_ has no vmap batching rule; torch's warning about it (asking
    users to file a torch issue) must not reach the progress output. Other warnings pass."""
    specs = [s.replace(steps=2) for s in three_members("batch_renorm")[:2]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with silenced(BATCHING_RULE_WARNING):
            warnings.warn("another warning", UserWarning, stacklevel=1)
        run_pack(specs)
    messages = [str(w.message) for w in caught]
    assert messages == ["another warning"], messages
