"""Probes I against ground truth (explicit enumeration, numpy SVD, closed forms) and hygiene."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from cases import tiny_case
from normlab import probes
from normlab.probes.coherence import weight_gradient
from normlab.probes.per_example import PerExampleGradients
from normlab.utils.config import ConfigError

# -- coherence -------------------------------------------------------------------------------------

def enumerated_coherence(conv: nn.Conv2d, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """|sum of terms| / sum |terms| per kernel entry, by listing every term d * a."""
    a = nn.functional.pad(a, [conv.padding[1]] * 2 + [conv.padding[0]] * 2)
    out_c, in_c, kh, kw = conv.weight.shape
    _, _, oh, ow = d.shape
    ratio = torch.zeros(out_c, in_c, kh, kw, dtype=torch.float64)
    for o, i, kx, ky in itertools.product(range(out_c), range(in_c), range(kh), range(kw)):
        terms = [d[b, o, w, h] * a[b, i, w + kx, h + ky]
                 for b in range(d.shape[0]) for w in range(oh) for h in range(ow)]
        terms = torch.stack(terms)
        ratio[o, i, kx, ky] = terms.sum().abs() / terms.abs().sum()
    return ratio


def test_coherence_equals_explicit_enumeration_on_a_tiny_conv():
    case = tiny_case("batch", batch=3, size=4)
    conv = case.model.conv2
    captured = {}

    def hook(module, inputs, output):
        captured["a"] = inputs[0].detach()
        output.register_hook(lambda g: captured.update(d=g))

    handle = conv.register_forward_hook(hook)
    case.loss_fn(case.model(case.x), case.y).backward()
    handle.remove()
    want = enumerated_coherence(conv, captured["a"], captured["d"])
    signed = weight_gradient(conv, captured["a"], captured["d"])
    torch.testing.assert_close(signed, conv.weight.grad)  # the terms sum to the gradient
    case.model.zero_grad(set_to_none=True)
    records = probes.gradient_coherence(case.model, case.loss_fn, (case.x, case.y),
                                        layers=["conv2"])
    got = {r["quantity"]: r["value"] for r in records}
    assert got["coherence_median"] == pytest.approx(want.median().item(), rel=1e-9)
    assert got["coherence_mean"] == pytest.approx(want.mean().item(), rel=1e-9)
    assert {r["layer"] for r in records} == {"conv2"} and records[0]["depth"] == 2


def test_coherence_is_one_when_terms_share_a_sign():
    conv = nn.Conv2d(1, 1, 2, bias=False, dtype=torch.float64)
    a = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    d = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    ratio = weight_gradient(conv, a, d).abs() / weight_gradient(conv, a.abs(), d.abs())
    torch.testing.assert_close(ratio, torch.ones_like(ratio))


# -- spectrum -------------------------------------------------------------------------------------

def test_spectrum_matches_numpy_svd_of_the_explicit_matrix():
    gen = torch.Generator().manual_seed(3)
    grads = {"a.weight": torch.randn(5, 3, 4, generator=gen, dtype=torch.float64),
             "a.bias": torch.randn(5, 3, generator=gen, dtype=torch.float64)}
    records, directions = probes.gradient_spectrum(grads, gradient="per_example_loss_grads",
                                                   return_directions=True)
    matrix = np.concatenate([grads["a.weight"].reshape(5, -1).numpy(),
                             grads["a.bias"].numpy()], axis=1)  # (B, P)
    _u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    sv = [r["value"] for r in records if r["quantity"] == "singular_value"]
    np.testing.assert_allclose(sv, s, rtol=1e-9)
    value = {r["quantity"]: r["value"] for r in records if r["quantity"] != "singular_value"}
    p = s ** 2 / (s ** 2).sum()
    assert value["energy_share_top"] == pytest.approx(p[0])
    assert value["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert value["mean_pairwise_cosine"] == pytest.approx((cos.sum() - 5) / 20)
    v1 = np.concatenate([directions["a"]["a.weight"].reshape(-1).numpy(),
                         directions["a"]["a.bias"].numpy()])
    assert abs(v1 @ vt[0]) == pytest.approx(1.0)
    assert v1 @ matrix.sum(0) >= 0
    assert {r["gradient"] for r in records} == {"per_example_loss_grads"}


def test_rank_one_matrix_has_energy_share_one():
    direction = torch.randn(7, dtype=torch.float64)
    scales = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    grads = {"fc.weight": scales[:, None] * direction}
    value = {r["quantity"]: r["value"]
             for r in probes.gradient_spectrum(grads, gradient="per_example_contributions")
             if r["quantity"] != "singular_value"}
    assert value["energy_share_top"] == pytest.approx(1.0)
    assert value["effective_rank"] == pytest.approx(1.0)
    assert value["top_direction_mean_cosine"] == pytest.approx(1.0)


def test_spectrum_needs_to_know_the_quantity():
    with pytest.raises(ConfigError, match="'gradient'"):
        probes.gradient_spectrum({"fc.weight": torch.randn(3, 2)})


def test_spectrum_takes_labels_from_the_probe_result():
    case = tiny_case("batch")
    grads = probes.per_example_contributions(case.model, case.loss_fn, (case.x, case.y))
    assert isinstance(grads, PerExampleGradients)
    records = probes.gradient_spectrum(grads)
    fc = [r for r in records if r["layer"] == "fc"]
    assert fc[0]["depth"] == 3 and fc[0]["gradient"] == "per_example_contributions"
    assert {r["bn_mode"] for r in records} == {"train"}


# -- activations, outputs, histograms -------------------------------------------------------------

def test_activation_stats_equal_moments_of_the_layer_output():
    case = tiny_case("group")
    with torch.no_grad():
        out = case.model.conv1(case.x)  # (B, C, H, W)
    records = probes.activation_stats(case.model, case.x, layers=[1])
    mean = {r["channel"]: r["value"] for r in records if r["quantity"] == "mean"}
    var = {r["channel"]: r["value"] for r in records if r["quantity"] == "variance"}
    sq = {r["channel"]: r["value"] for r in records if r["quantity"] == "squared_mean"}
    for c in range(out.shape[1]):
        assert mean[c] == pytest.approx(out[:, c].mean().item())
        assert var[c] == pytest.approx(out[:, c].var(unbiased=False).item())
        assert sq[c] == pytest.approx((out[:, c] ** 2).mean().item())
    assert {r["layer"] for r in records} == {"conv1"}


def test_activation_hooks_are_removed_even_on_error():
    case = tiny_case("none")
    with pytest.raises(RuntimeError):
        probes.activation_stats(case.model, torch.randn(2, 5, 4, 4, dtype=torch.float64))
    assert all(not m._forward_hooks for m in case.model.modules())


def test_unknown_layer_is_refused_with_the_choices():
    case = tiny_case("none")
    with pytest.raises(ConfigError, match="conv1"):
        probes.activation_stats(case.model, case.x, layers=["conv9"])


def test_output_gradients_are_softmax_minus_onehot():
    case = tiny_case("batch")
    records = probes.output_gradients(case.model, case.loss_fn, (case.x, case.y))
    with torch.no_grad():
        want = torch.softmax(case.model(case.x), dim=1)
    want[torch.arange(6), case.y] -= 1
    got = torch.zeros_like(want)
    for r in records:
        got[r["example"], r["class_index"]] = r["value"]
    torch.testing.assert_close(got, want)


def test_tail_statistics_gaussian_and_pareto():
    gen = torch.Generator().manual_seed(0)
    gauss = probes.tail_statistics(torch.randn(200_000, generator=gen, dtype=torch.float64))
    assert abs(gauss["excess_kurtosis"]) < 0.1
    pareto = torch.rand(200_000, generator=gen, dtype=torch.float64) ** (-1 / 2.0)  # alpha 2
    stats = probes.tail_statistics(pareto, k=2000)
    assert stats["hill_tail_index"] == pytest.approx(2.0, rel=0.1)
    assert stats["hill_k"] == 2000


def test_histogram_counts_every_entry_of_the_batch_gradient():
    case = tiny_case("none")
    records = probes.gradient_histogram(case.model, case.loss_fn, (case.x, case.y),
                                        layers=["conv2"], bins=10)
    counts = [r for r in records if r["quantity"] == "count"]
    assert len(counts) == 10 and sum(r["value"] for r in counts) == 4 * 4 * 9
    grad = torch.autograd.grad(case.loss_fn(case.model(case.x), case.y),
                               case.model.conv2.weight)[0]
    rng = {r["quantity"]: r["value"] for r in records}["range"]
    assert rng == pytest.approx((grad.max() - grad.min()).item())


# -- hygiene: every probe leaves the model exactly as it found it ----------------------------------

def _state(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "grads": {k: None if p.grad is None else p.grad.clone()
                      for k, p in model.named_parameters()},
            "flags": {k: p.requires_grad for k, p in model.named_parameters()},
            "modes": {k: m.training for k, m in model.named_modules()},
            "rng": torch.get_rng_state().clone(),
            "hooks": sum(len(m._forward_hooks) + len(m._backward_hooks)
                         for m in model.modules())}


PROBES = {
    "activation_stats": lambda c: probes.activation_stats(c.model, c.x),
    "per_example_loss_grads": lambda c: probes.per_example_loss_grads(c.model, c.loss_fn,
                                                                      (c.x, c.y)),
    "per_example_contributions": lambda c: probes.per_example_contributions(c.model, c.loss_fn,
                                                                            (c.x, c.y)),
    "gradient_coherence": lambda c: probes.gradient_coherence(c.model, c.loss_fn, (c.x, c.y)),
    "gradient_spectrum": lambda c: probes.gradient_spectrum(
        probes.per_example_loss_grads(c.model, c.loss_fn, (c.x, c.y))),
    "step_loss": lambda c: probes.step_loss(c.model, c.loss_fn, (c.x, c.y),
                                            steps=[1e-3, 10.0], eval_batch=(c.x[:3], c.y[:3])),
    "step_anatomy": lambda c: probes.step_anatomy(c.model, c.loss_fn, (c.x, c.y), step=1.0,
                                                  layers=[1, "norm2"], points=3),
    "output_gradients": lambda c: probes.output_gradients(c.model, c.loss_fn, (c.x, c.y)),
    "gradient_histogram": lambda c: probes.gradient_histogram(c.model, c.loss_fn, (c.x, c.y)),
}


@pytest.mark.parametrize("norm", ["batch", "batch_renorm", "group"])
@pytest.mark.parametrize("probe", list(PROBES))
def test_probe_leaves_the_model_unchanged(probe, norm):
    case = tiny_case(norm)
    model = case.model
    model.norm1.eval() if norm == "batch" else None  # a mixed-mode model
    model.conv1.weight.requires_grad_(False)
    case.loss_fn(model(case.x), case.y).backward()  # existing .grad must survive
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.add_(0.3)
    before = _state(model)
    reference = copy.deepcopy(model)
    PROBES[probe](case)
    after = _state(model)
    for key in ("state", "grads"):
        for name, value in before[key].items():
            other = after[key][name]
            assert (value is None) == (other is None), name
            if value is not None:
                assert torch.equal(value, other), f"{key} {name}"
    for key in ("flags", "modes", "hooks"):
        assert before[key] == after[key], key
    assert torch.equal(before["rng"], after["rng"])
    with torch.no_grad():  # and it still computes the same function (batch statistics too)
        torch.testing.assert_close(model(case.x), reference(case.x), rtol=0, atol=0)


# -- the documentation's example runs ---------------------------------------------------------

def test_probes_doc_example_runs():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "probes.md").read_text()
    section = text.split("## Probes I")[1].split("\n## ")[0]
    code = section.split("```python\n")[1].split("```")[0]
    exec(compile(code, "docs/probes.md", "exec"), {})


# -- callbacks: the trainer calls the same probes on a schedule ------------------------------------

@pytest.mark.parametrize("name", ["activation_stats", "step_loss", "gradient_coherence",
                                  "gradient_spectrum"])
def test_scheduled_callbacks_log_tagged_records(name):
    from normlab.runs.spec import RunSpec
    from normlab.runs.tasks import RunContext
    from normlab.train.callbacks import TrainState, scheduled

    case = tiny_case("batch")
    context = RunContext()
    callback = scheduled(name, every=2)
    for step in (1, 2):
        callback(TrainState(spec=RunSpec(), step=step, epoch=0.0, total_steps=2,
                            model=case.model, optimizer=None, loss_fn=case.loss_fn, x=case.x,
                            y=case.y, loss=None, lr=0.1, device=torch.device("cpu"),
                            context=context))
    assert context.records and {r["step"] for r in context.records} == {2}
    assert {r["probe"] for r in context.records} == {name}
