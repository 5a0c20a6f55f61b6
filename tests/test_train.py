"""normlab.train: divergence, determinism, learning, callbacks, evaluation mode, projection."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from cases import tiny_case
from normlab.execute.local import LocalExecutor
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext, get_task
from normlab.train import TrainState, lr_at, register_callback, train
from normlab.train.build import resolve_device
from normlab.train.divergence import check_divergence, json_safe
from normlab.train.projection import UpdateProjection
from normlab.utils.config import ConfigError

TINY_DATA = {"n_train": 96, "n_test": 48, "shape": [3, 8, 8], "num_classes": 4}


def tiny(**changes) -> RunSpec:
    """A ResNet-8 of width 4 on 96 synthetic 8x8 images: a few ms per step."""
    settings = {"data": "synthetic", "data_options": TINY_DATA, "depth": 8, "width": 4,
                "batch_size": 16, "steps": 12, "lr": 0.05, "log_every": 1, "device": "cpu",
                "schedule": "constant", **changes}
    return RunSpec(**settings)


def eval_rows(context: RunContext) -> list[dict]:
    return [r for r in context.metrics if r.get("kind") == "eval"]


def step_rows(context: RunContext) -> list[dict]:
    return [r for r in context.metrics if "kind" not in r]


# -- divergence -------------------------------------------------------------------------------

def test_a_huge_learning_rate_is_a_diverged_result_not_an_error():
    context = RunContext()
    result = train(tiny(norm="none", lr=1e4), context=context)
    assert result.status == "diverged"
    assert isinstance(result.diverged_step, int) and result.diverged_step >= 0
    reason = result.final["diverged_reason"]
    assert reason in ("threshold", "inf", "nan")
    assert (result.diverged_loss is None) == (reason != "threshold")
    if reason == "threshold":
        assert result.diverged_loss > 1e3
    last = step_rows(context)[-1]
    assert last["step"] == result.diverged_step  # the diverging step is logged
    json.dumps(result.to_dict(), allow_nan=False)  # strict JSON
    for row in context.metrics:
        json.dumps(row, allow_nan=False)


def test_final_metrics_never_shadow_a_setting_in_the_runs_table():
    settings = set(tiny().to_dict())
    completed, diverged = train(tiny(steps=3)), train(tiny(diverge_loss=0.5))
    assert set(completed.final) == {"train_loss", "train_acc", "test_loss", "test_acc",
                                    "final_lr"}
    assert completed.final["final_lr"] == 0.05
    assert not (set(completed.final) | set(diverged.final)) & settings


def test_the_threshold_is_the_specs_diverge_loss():
    result = train(tiny(diverge_loss=0.5))  # the first loss (about ln 4) is above 0.5
    assert result.status == "diverged"
    assert result.diverged_step == 0
    assert result.final["diverged_reason"] == "threshold"
    assert 0.5 < result.diverged_loss < 10


@pytest.mark.parametrize(("loss", "reason", "stored"),
                         [(math.nan, "nan", None), (math.inf, "inf", None),
                          (2e3, "threshold", 2e3)])
def test_divergence_reasons_and_json_storage(loss, reason, stored):
    divergence = check_divergence(loss, 7, 1e3)
    assert divergence.step == 7 and divergence.reason == reason
    assert divergence.stored_loss == stored
    assert check_divergence(999.0, 7, 1e3) is None
    assert json_safe({"loss": loss, "step": 7}) == {"loss": stored, "step": 7}


def test_a_study_goes_on_after_a_diverged_run(tmp_path):
    specs = [tiny(norm="none", lr=1e4), tiny(steps=4)]
    results = dict(LocalExecutor().run(specs, tmp_path))
    assert [results[s].status for s in specs] == ["diverged", "completed"]
    for s in specs:
        assert (tmp_path / "runs" / s.run_id / "result.json").exists()


# -- determinism, learning, budget ------------------------------------------------------------

def test_same_spec_same_numbers_and_the_global_rng_is_left_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second = RunContext(), RunContext()
    a = train(tiny(), context=first)
    assert torch.equal(torch.get_rng_state(), before)
    b = train(tiny(), context=second)
    assert a.final == b.final and first.metrics == second.metrics
    c = train(tiny(seed=1))
    assert c.final["train_loss"] != a.final["train_loss"]


def test_the_loss_goes_down_on_learnable_data():
    context = RunContext()
    spec = tiny(steps=None, epochs=6, lr=0.1, data_options={**TINY_DATA, "n_train": 192})
    result = train(spec, context=context)
    assert result.status == "completed"
    evals = eval_rows(context)
    assert len(evals) == 6
    assert evals[-1]["train_loss"] < 0.7 * evals[0]["train_loss"]
    assert result.final["test_acc"] > 0.5  # chance is 0.25


def test_budget_in_steps_or_epochs():
    per_epoch = 96 // 16
    assert train(tiny(steps=7)).steps == 7
    assert train(tiny(steps=None, epochs=1.5)).steps == math.ceil(1.5 * per_epoch)


def test_rows_follow_log_every_and_the_schedule():
    context = RunContext()
    spec = tiny(steps=13, log_every=4, schedule="cosine", warmup=0.2)
    train(spec, context=context)
    rows = step_rows(context)
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    assert [r["lr"] for r in rows] == [lr_at(s, 13, spec) for s in (0, 4, 8, 12)]
    assert set(rows[0]) == {"step", "epoch", "lr", "loss", "acc"}
    # an eval row after each of the two full epochs and at the end of the partial third
    assert [r["step"] for r in eval_rows(context)] == [6, 12, 13]


# -- callbacks --------------------------------------------------------------------------------

def test_callbacks_see_step_zero_and_every_step():
    seen: list[tuple[int, float | None, float]] = []

    def record(state: TrainState) -> None:
        seen.append((state.step, state.loss, state.lr))
        assert state.model.training

    context = RunContext()
    train(tiny(steps=5), callbacks=[record], context=context)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4, 5]
    assert seen[0][1] is None
    losses = [r["loss"] for r in step_rows(context)]  # row s: the loss before update s + 1
    assert [loss for _, loss, _ in seen[1:]] == pytest.approx(losses, rel=1e-6)


@register_callback("test_train_recorder", overwrite=True)
def _recorder(tag: str = "") -> object:
    def callback(state: TrainState) -> None:
        state.context.log_records("test_train_recorder", [{"tag": tag}], step=state.step)

    return callback


def test_spec_probes_run_on_their_schedule():
    context = RunContext()
    spec = tiny(steps=7, probes=[{"name": "test_train_recorder", "every": 3, "tag": "x"}])
    train(spec, context=context)
    assert [r["step"] for r in context.records] == [0, 3, 6]
    assert {r["tag"] for r in context.records} == {"x"}


def test_batch_renorm_is_told_the_training_fraction():
    fractions: list[tuple[int, float]] = []

    def record(state: TrainState) -> None:
        layer = next(m for m in state.model.modules() if hasattr(m, "training_fraction"))
        fractions.append((state.step, layer.training_fraction))

    train(tiny(norm="batch_renorm", steps=4), callbacks=[record])
    # after update k the layer was last told the fraction of step k-1
    assert fractions[1:] == [(k, (k - 1) / 4) for k in range(1, 5)]


# -- evaluation -------------------------------------------------------------------------------

def test_evaluation_uses_running_statistics():
    models: list[nn.Module] = []
    spec = tiny(steps=6)
    result = train(spec, callbacks=[lambda s: models.append(s.model)])
    model = models[-1]
    from normlab.data import load

    _, test = load("synthetic", **TINY_DATA)
    with torch.no_grad():
        model.eval()
        eval_loss = nn.functional.cross_entropy(model(test.x), test.y).item()
        model.train()
        batch_loss = nn.functional.cross_entropy(model(test.x), test.y).item()
    assert result.final["test_loss"] == pytest.approx(eval_loss, rel=1e-5)
    assert abs(batch_loss - eval_loss) > 1e-3  # the two modes differ, so the test can fail


# -- settings ---------------------------------------------------------------------------------

def test_bad_train_options_are_named():
    with pytest.raises(ConfigError, match="bogus"):
        train(tiny(options={"bogus": 1}))
    with pytest.raises(ConfigError, match="nesterov"):
        train(tiny(momentum=0.0, nesterov=True))


def test_auto_device_honours_the_environment(monkeypatch):
    monkeypatch.setenv("NORMLAB_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.delenv("NORMLAB_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("speed", [{"channels_last": True}, {"autocast": "bf16"}])
def test_speed_settings_train_the_same_model(speed):
    plain, fast = train(tiny(steps=3)), train(tiny(steps=3, **speed))
    assert fast.status == "completed"
    tolerance = 1e-4 if "channels_last" in speed else 0.05  # bf16 rounds activations
    assert fast.final["test_loss"] == pytest.approx(plain.final["test_loss"], rel=tolerance)


def test_progress_is_reported_up_to_the_end():
    seen: list[float] = []
    context = RunContext(on_progress=lambda run_id, fraction, message: seen.append(fraction))
    result = train(tiny(steps=9), context=context)
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert result.provenance["device"] == "cpu" and result.provenance["seed"] == 0


def test_train_is_the_registered_train_task():
    result = get_task("train")(tiny(steps=2), RunContext())
    assert result.status == "completed" and result.provenance["run_id"] == tiny(steps=2).run_id


# -- update projection ------------------------------------------------------------------------

def filters(w: torch.Tensor) -> np.ndarray:
    return w.detach().reshape(w.shape[0], -1).numpy().copy()


def test_tangential_updates_change_filter_norms_only_at_second_order():
    case = tiny_case("batch")
    model = case.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    projection = UpdateProjection(model, "tangential")
    other = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}
    before = [filters(w) for w in projection.weights]
    case.loss_fn(model(case.x), case.y).backward()
    projection.before()
    optimizer.step()
    projection.after()
    for w_before, w in zip(before, projection.weights, strict=True):
        d = filters(w) - w_before
        # brute force: each filter's update is orthogonal to the filter
        np.testing.assert_allclose(np.einsum("ij,ij->i", d, w_before), 0, atol=1e-12)
        np.testing.assert_allclose((filters(w) ** 2).sum(1),
                                   (w_before ** 2).sum(1) + (d ** 2).sum(1), rtol=1e-12)
        assert np.abs(d).max() > 1e-4  # the step did move the weights
    for name, p in model.named_parameters():  # biases and norm affine: the plain SGD step
        if p.dim() == 1:
            expected = other[name] - 0.5 * (p.grad + 1e-2 * other[name])
            torch.testing.assert_close(p.detach(), expected)


def test_radial_updates_keep_each_filters_direction():
    case = tiny_case("none")
    optimizer = torch.optim.SGD(case.model.parameters(), lr=0.5)
    projection = UpdateProjection(case.model, "radial")
    before = [filters(w) for w in projection.weights]
    case.loss_fn(case.model(case.x), case.y).backward()
    grads = [filters(w.grad) for w in projection.weights]
    projection.before()
    optimizer.step()
    projection.after()
    for w_before, g, w in zip(before, grads, projection.weights, strict=True):
        # closed form: w + (<-lr g, w> / ||w||^2) w per filter
        coef = (-0.5 * g * w_before).sum(1) / (w_before ** 2).sum(1)
        np.testing.assert_allclose(filters(w), w_before * (1 + coef[:, None]), rtol=1e-10)


def test_training_with_tangential_projection_applies_it_every_step():
    snapshots: list[list[np.ndarray]] = []

    def snapshot(state: TrainState) -> None:
        snapshots.append([filters(m.weight).astype(np.float64) for m in state.model.modules()
                          if isinstance(m, nn.Conv2d)])

    train(tiny(steps=3, update_projection="tangential", lr=0.2), callbacks=[snapshot])
    for prev, nxt in itertools.pairwise(snapshots):
        for w0, w1 in zip(prev, nxt, strict=True):
            d = w1 - w0
            np.testing.assert_allclose(np.einsum("ij,ij->i", d, w0), 0,
                                       atol=1e-5 * np.abs(w0).sum())
