"""Every probe over a zoo of user-style models, against brute force, and the hygiene check.

Probes and zoo models join by registration (`PROBES` here, `zoo.ZOO`): each probe entry says
how to run it on a `ZooCase` and how to check its numbers against an independent reference
computed on a deep copy of the model (one backward per example, a dense Hessian, a direct
evaluation of moved weights, ...). Probes run in `mode="train"` (normalization layers on batch
statistics, Dropout off), which the references reproduce with `zoo.in_mode`. The hygiene test
builds a graph on the model *before* the probe and back-propagates it afterwards.
Both are marked `device`: `NORMLAB_TEST_DEVICE=cuda python -m pytest -m device` runs them on a
GPU (TF32 off, float64 where the reference needs it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from brute_force import contributions_by_copies, dense_hessian_eigvals
from cases import assert_unchanged, model_snapshot
from normlab import probes
from normlab.utils.config import ConfigError
from normlab.utils.registry import Registry
from zoo import ZOO, ZooCase, in_mode

# -- the brute-force side -------------------------------------------------------------------------


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def ell(case: ZooCase, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-example losses, written out for the zoo's two losses (a mean-reduced loss with
    several outputs per example, a language model's tokens, averages them)."""
    if isinstance(case.loss_fn, nn.MSELoss):
        sq = (out - y).pow(2).reshape(out.shape[0], -1)
        return sq.sum(1) if case.loss_fn.reduction == "sum" else sq.mean(1)
    return nn.functional.cross_entropy(out, y, reduction="none").reshape(out.shape[0], -1).mean(1)


def grads_of(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {n: torch.zeros_like(p) if g is None else g
            for (n, p), g in zip(params.items(), got, strict=True)}


def loop_grads(case: ZooCase) -> dict[str, torch.Tensor]:
    """g_i = d ell_i / d theta: the batch forward, then one backward per example."""
    ref = in_mode(case.model, "train")
    params = trainable(ref)
    losses = ell(case, ref(case.x), case.y)
    rows = [grads_of(losses[i], params) for i in range(case.x.shape[0])]
    return {n: torch.stack([r[n] for r in rows]) for n in params}


def batch_grad(case: ZooCase, x=None, y=None) -> dict[str, torch.Tensor]:
    ref = in_mode(case.model, "train")
    x, y = (case.x, case.y) if x is None else (x, y)
    return grads_of(case.loss_fn(ref(x), y), trainable(ref))


def loss_at(case: ZooCase, moved: dict[str, torch.Tensor], x, y) -> float:
    ref = in_mode(case.model, "train")
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in moved:
                p.copy_(moved[n])
        return float(case.loss_fn(ref(x), y))


_DENSE: dict[tuple[str, str], torch.Tensor] = {}


def cached_hessian_eigvals(case: ZooCase) -> torch.Tensor:
    """Eigenvalues of the dense Hessian of the batch loss (cached per zoo model and device)."""
    key = (case.name, str(case.x.device))
    if key not in _DENSE:
        _DENSE[key] = _dense_hessian_eigvals(case)
    return _DENSE[key]


def _dense_hessian_eigvals(case: ZooCase) -> torch.Tensor:
    return dense_hessian_eigvals(in_mode(case.model, "train"), case.loss_fn, case.x, case.y,
                                 by_differences=case.hessian_by_differences)


def as_double(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().double().cpu()
    return torch.tensor(value, dtype=torch.float64)


def close(got, want, case: ZooCase, name: str = "", scale=None) -> None:
    """|got - want| <= rtol x scale (default: max |want|), rtol from the case's dtype."""
    got, want = as_double(got), as_double(want)
    scale = want.abs().max().clamp_min(1e-12) if scale is None else as_double(scale)
    assert (got - want).abs().max() <= case.rtol * scale, f"{name}: {got} vs {want}"


def records_of(result) -> list[dict]:
    if isinstance(result, tuple):
        result = result[0]
    return result.records()


# -- the registry of probes -----------------------------------------------------------------------


@dataclass
class ProbeEntry:
    run: Callable[[ZooCase], object]
    check: Callable[[ZooCase, object], None]
    refusal: Callable[[ZooCase], str | None]  # the ConfigError a case must get, if any


PROBES: Registry[ProbeEntry] = Registry("probe")


def register_probe(name: str, run: Callable[[ZooCase], object],
                   refusal: Callable[[ZooCase], str | None] = lambda case: None):
    def decorator(check: Callable[[ZooCase, object], None]):
        PROBES.register(name)(ProbeEntry(run, check, refusal))
        return check

    return decorator


@register_probe("per_example_loss_grads", lambda c: probes.per_example_loss_grads(
    c.model, c.loss_fn, c.data, mode="train"))
def _check_loss_grads(case, got):
    want = loop_grads(case)
    assert set(got) == set(want)
    for n in want:
        close(got[n], want[n], case, n)
    if case.coupled:
        assert got.method == "vjp" and got.reason


@register_probe("per_example_contributions", lambda c: probes.per_example_contributions(
    c.model, c.loss_fn, c.data, mode="train"))
def _check_contributions(case, got):
    """Sums against the batch gradient; rows against the per-example gradients (no coupling)
    or against the layer copies of `brute_force` (coupling); every other trainable parameter
    left out with a reason."""
    want_sum = batch_grad(case)
    assert got, "no contributions"
    for n, c in got.items():
        close(c.sum(0), want_sum[n], case, n)
    assert set(got) | set(got.left_out) == set(trainable(case.model))
    assert all(got.left_out.values())
    if not case.coupled:
        per = loop_grads(case)
        factor = 1.0 if getattr(case.loss_fn, "reduction", "mean") == "sum" else 1 / len(case.x)
        for n, c in got.items():
            close(c, per[n] * factor, case, n)
    else:
        copies = contributions_by_copies(in_mode(case.model, "train"), case.loss_fn, case.x,
                                         case.y)
        for n, c in got.items():
            close(c, copies[n], case, n)


@register_probe("hessian_eigs", lambda c: probes.hessian_eigs(
    c.model, c.loss_fn, c.data, k=1, tol=1e-9, max_iter=80))
def _check_hessian(case, got):
    want = cached_hessian_eigvals(case)
    assert abs(got.values[0] - float(want.max())) <= max(case.rtol, 1e-5) * want.abs().max()
    assert got.finite and got.bn_mode in ("train", "eval")


@register_probe("spectral_density", lambda c: probes.spectral_density(c.model, c.loss_fn, c.data,
                                                                      steps=6))
def _check_density(case, got):
    want = cached_hessian_eigvals(case)
    slack = max(case.rtol, 1e-6) * want.abs().max()
    assert float(got.weights[0].sum()) == pytest.approx(1.0, rel=1e-6)
    assert float(got.nodes[0].max()) <= float(want.max()) + slack  # Ritz values interlace
    assert float(got.nodes[0].min()) >= float(want.min()) - slack


def _direction(case: ZooCase) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {n: (0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)).to(p.device)
            for n, p in trainable(case.model).items()}


@register_probe("landscape", lambda c: probes.landscape(
    c.model, c.loss_fn, [c.data, (c.x2, c.y2)], directions=[_direction(c)], span=1.0, points=3))
def _check_landscape(case, got):
    d = _direction(case)
    params = trainable(case.model)
    for r in got:
        moved = {n: p.detach() + r["alpha"] * d[n] for n, p in params.items()}
        want = (loss_at(case, moved, case.x, case.y) + loss_at(case, moved, case.x2, case.y2)) / 2
        close(r["value"], want, case, f"alpha={r['alpha']}")


@register_probe("step_loss", lambda c: probes.step_loss(c.model, c.loss_fn, c.data,
                                                        steps=[0.0, 1e-2, 0.3]))
def _check_step_loss(case, got):
    g = batch_grad(case)
    params = trainable(case.model)
    start = loss_at(case, {}, case.x, case.y)
    for r in got:
        moved = {n: p.detach() - r["step_size"] * g[n] for n, p in params.items()}
        close(r["value"], loss_at(case, moved, case.x, case.y) / start, case, str(r["step_size"]))


@register_probe("radial_tangential", lambda c: probes.radial_tangential(
    c.model, c.loss_fn, c.data, granularity="layer", mode="train"))
def _check_radial(case, got):
    g = batch_grad(case)
    shares = {r["layer"]: r["value"] for r in got if r["quantity"] == "radial_share"}
    assert shares
    for layer, value in shares.items():
        key = f"{layer}.weight"
        w = dict(case.model.named_parameters())[key].detach()
        gk = g[key]
        norms = float(gk.norm()) * float(w.norm())
        want = abs(float((gk * w).sum())) / norms if norms > 0 else 0.0  # an unused layer
        close(value, want, case, layer)


@register_probe("mean_gradient", lambda c: probes.mean_gradient(c.model, c.loss_fn,
                                                                [c.data, (c.x2, c.y2)]))
def _check_mean_gradient(case, got):
    g1, g2 = batch_grad(case), batch_grad(case, case.x2, case.y2)
    for n in g1:
        close(got.gradient[n], (g1[n] + g2[n]) / 2, case, n)


def _outputs_of_weight_layers(case: ZooCase) -> dict[str, torch.Tensor]:
    ref = in_mode(case.model, "train")
    out = {}
    handles = [m.register_forward_hook(
        lambda m, i, o, name=name: out.setdefault(name, o.detach()))
        for name, m in ref.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    with torch.no_grad():
        ref(case.x)
    for h in handles:
        h.remove()
    return out


@register_probe("activation_stats", lambda c: probes.activation_stats(c.model, c.data,
                                                                      mode="train"))
def _check_activations(case, got):
    outputs = _outputs_of_weight_layers(case)
    means = {(r["layer"], r["channel"]): r["value"] for r in got if r["quantity"] == "mean"}
    assert means
    for (layer, channel), value in means.items():
        out = outputs[layer]
        close(value, out.transpose(0, 1)[channel].mean(), case, layer, scale=out.abs().max())


@register_probe("output_gradients", lambda c: probes.output_gradients(c.model, c.loss_fn, c.data,
                                                                      mode="train"))
def _check_outputs(case, got):
    ref = in_mode(case.model, "train")
    z = ref(case.x).detach().requires_grad_(True)
    (want,) = torch.autograd.grad(ell(case, z, case.y).sum(), z)
    want = want.reshape(want.shape[0], -1)
    for r in got:
        close(r["value"], want[r["example"], r["class_index"]], case)


@register_probe("gradient_histogram", lambda c: probes.gradient_histogram(
    c.model, c.loss_fn, c.data, mode="train"))
def _check_histogram(case, got):
    g = batch_grad(case)
    for layer in {r["layer"] for r in got}:
        rows = [r for r in got if r["layer"] == layer]
        weight = g.get(f"{layer}.weight")
        if weight is None:  # a frozen or tied weight under another name
            continue
        assert sum(r["value"] for r in rows if r["quantity"] == "count") == weight.numel()
        (top,) = [r["value"] for r in rows if r["quantity"] == "max"]
        close(top, weight.max(), case, layer)


@register_probe("gradient_coherence", lambda c: probes.gradient_coherence(
    c.model, c.loss_fn, c.data, mode="train"))
def _check_coherence(case, got):
    """Bounds everywhere; where the terms are the per-example gradients (no batch coupling, a
    Linear layer called once on (B, F) input, its weight not tied) the exact mean coherence.
    (On a (B*T, F) fold the terms are per row, which the per-example gradients sum up.)"""
    coherence = [r for r in got if r["quantity"].startswith("coherence")]
    assert coherence
    for r in coherence:  # undefined (NaN) only where every term is zero (a gated-off layer)
        assert 0.0 <= r["value"] <= 1.0 + 1e-12 or (math.isnan(r["value"]) and r["entries"] == 0)
    if case.coupled:
        return
    per = loop_grads(case)  # uncoupled: the terms of a once-called Linear on (B, F) are g_i
    modules = dict(case.model.named_modules())
    owners = [id(m.weight) for m in modules.values() if hasattr(m, "weight")]
    plain = _two_dimensional_inputs(case)
    for r in got:
        key, module = f"{r['layer']}.weight", modules[r["layer"]]
        if (r["quantity"] != "coherence_mean" or key not in per or r["layer"] not in plain
                or owners.count(id(module.weight)) > 1):
            continue
        terms = per[key]
        magnitude = terms.abs().sum(0)
        keep = magnitude > 0
        close(r["value"], (terms.sum(0).abs()[keep] / magnitude[keep]).mean(), case, key)


def _two_dimensional_inputs(case: ZooCase) -> set[str]:
    ref = in_mode(case.model, "train")
    seen: set[str] = set()
    handles = [m.register_forward_hook(
        lambda m, i, o, name=name: seen.add(name)
        if i[0].dim() == 2 and i[0].shape[0] == len(case.x) else None)
        for name, m in ref.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        ref(case.x)
    for h in handles:
        h.remove()
    return seen


@register_probe("jacobian_singular_values", lambda c: probes.jacobian_singular_values(
    c.model, c.data, k=2, method="lanczos", mode="train"),
    refusal=lambda c: None if c.x.is_floating_point() else "floating-point input")
def _check_jacobian(case, got):
    ref = in_mode(case.model, "train")
    J = torch.autograd.functional.jacobian(ref, case.x)
    out = ref(case.x)
    want = torch.linalg.svdvals(J.reshape(out.numel(), case.x.numel()).double())
    close(got.values[:2], want[:2], case)


@register_probe("lr_range_test", lambda c: probes.lr_range_test(
    c.model, c.loss_fn, [c.data], start=1e-2, end=2e-2, steps=3, smoothing=0.0, mode="train"))
def _check_lr_range(case, got):
    ref = in_mode(case.model, "train")
    params = trainable(ref)
    for lr, loss in zip(got.lrs, got.losses, strict=True):
        value = case.loss_fn(ref(case.x), case.y)
        close(loss, value, case, f"lr={lr}")
        with torch.no_grad():
            for p, g in zip(params.values(), grads_of(value, params).values(), strict=True):
                p -= lr * g


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture
def no_tf32(device):
    """TF32 off for the test on a GPU (it would cost ~3 decimal digits in float32 products)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


DENSE_HESSIAN = ("hessian_eigs", "spectral_density")  # the reference takes P double backwards


@pytest.mark.device
@pytest.mark.parametrize("zoo_name", ZOO.names())
@pytest.mark.parametrize("probe_name", [
    pytest.param(name, marks=pytest.mark.slow) if name in DENSE_HESSIAN else name
    for name in PROBES.names()])
def test_probe_matches_brute_force_on_the_zoo(probe_name, zoo_name, device, no_tf32):
    case = ZOO.get(zoo_name)(device)
    entry = PROBES.get(probe_name)
    refusal = entry.refusal(case)
    if refusal is not None:
        with pytest.raises(ConfigError, match=refusal):
            entry.run(case)
        return
    result = entry.run(case)
    entry.check(case, result)
    rows = records_of(result)
    assert rows and all(isinstance(r, dict) for r in rows)
    assert len(result.to_frame()) == len(rows)


@pytest.mark.device
@pytest.mark.parametrize("zoo_name", ZOO.names())
@pytest.mark.parametrize("probe_name", [
    pytest.param(name, marks=pytest.mark.slow)
    if name in ("hessian_eigs", "jacobian_singular_values") else name
    for name in PROBES.names()])
def test_probe_leaves_a_zoo_model_and_its_pending_graph_alone(probe_name, zoo_name, device,
                                                              no_tf32):
    case = ZOO.get(zoo_name)(device)
    pending = case.loss_fn(case.model(case.x), case.y)  # the user's graph, built before
    before = model_snapshot(case.model)
    hooks = [(len(m._forward_hooks), len(m._backward_hooks)) for m in case.model.modules()]
    entry = PROBES.get(probe_name)
    if entry.refusal(case) is None:
        entry.run(case)
    else:
        with pytest.raises(ConfigError):
            entry.run(case)
    assert_unchanged(before, case.model)
    assert hooks == [(len(m._forward_hooks), len(m._backward_hooks))
                     for m in case.model.modules()]
    pending.backward()  # no "modified by an inplace operation"
