"""radial_tangential: scale invariance under BN (ground truth), geometry, hygiene, callback."""

import pytest
import torch

from cases import NORM_KINDS, assert_unchanged, model_snapshot, tiny_case
from normlab.probes import radial_tangential
from normlab.probes.radial import minibatch_gradient, radial_share_total
from normlab.utils.config import ConfigError


def _values(records, quantity, layer=None):
    return [r["value"] for r in records
            if r["quantity"] == quantity and (layer is None or r["layer"] == layer)]


def _exact_bn(case):
    """BN's eps breaks scale invariance by O(eps / var); a negligible eps makes it exact."""
    for module in case.model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase):
            module.eps = 1e-14
    return case


@pytest.mark.parametrize("granularity", ["filter", "layer"])
def test_batchnorm_followed_weights_have_no_radial_gradient(granularity):
    case = _exact_bn(tiny_case("batch"))
    records = radial_tangential(case.model, granularity=granularity, loss_fn=case.loss_fn,
                                data=(case.x, case.y))
    for layer in ("conv1", "conv2"):  # followed by BatchNorm in train mode: scale-invariant
        shares = _values(records, "radial_share", layer)
        assert shares and max(shares) < 1e-5
        assert max(abs(c) for c in _values(records, "cosine", layer)) < 1e-5
    assert max(_values(records, "radial_share", "fc")) > 1e-3  # the classifier is not invariant


def test_default_eps_leaves_a_small_radial_share():
    case = tiny_case("batch")  # eps = 1e-5 against pre-norm variances of order 0.1-1
    records = radial_tangential(case.model, loss_fn=case.loss_fn, data=(case.x, case.y))
    assert max(_values(records, "radial_share", "conv2")) < 1e-3


def test_unnormalized_weights_have_a_radial_gradient():
    case = tiny_case("none")
    records = radial_tangential(case.model, granularity="layer", loss_fn=case.loss_fn,
                                data=(case.x, case.y))
    for layer in ("conv1", "conv2"):
        assert _values(records, "radial_share", layer)[0] > 1e-3


def test_scale_invariance_is_what_the_probe_sees():
    # ground truth: for a scale-invariant filter, L(c w) = L(w), so d/dc L = <g, w> = 0
    case = _exact_bn(tiny_case("batch"))
    w = case.model.conv1.weight
    with torch.no_grad():
        base = float(case.loss_fn(case.model(case.x), case.y))
        w.mul_(1.7)
        scaled = float(case.loss_fn(case.model(case.x), case.y))
        w.div_(1.7)
    assert abs(base - scaled) < 1e-10


def test_parts_match_the_definition():
    case = tiny_case("none")
    model = case.model
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    records = radial_tangential(model, grads=grads, granularity="filter", lr=0.1, source="random")
    w, g = model.conv2.weight.detach(), grads["conv2.weight"]
    for channel in range(w.shape[0]):
        wf, gf = w[channel].reshape(-1), g[channel].reshape(-1)
        radial = (gf @ wf) / (wf @ wf) * wf
        expected = {"radial_norm": radial.norm(), "tangential_norm": (gf - radial).norm(),
                    "cosine": (gf @ wf) / (gf.norm() * wf.norm()),
                    "effective_lr": 0.1 / (wf @ wf)}
        for quantity, value in expected.items():
            got = [r["value"] for r in records if r["layer"] == "conv2"
                   and r["channel"] == channel and r["quantity"] == quantity]
            assert got == pytest.approx([float(value)], rel=1e-10)
    assert {r["source"] for r in records} == {"random"}
    assert {r["bn_mode"] for r in records} == {"train"}


def test_total_radial_share_of_a_pure_radial_direction_is_one():
    case = tiny_case("none")
    grads = {n: 2.0 * p.detach() for n, p in case.model.named_parameters()}
    assert radial_share_total(case.model, grads) == pytest.approx(1.0)


@pytest.mark.parametrize("norm", NORM_KINDS)
def test_radial_tangential_leaves_the_model_unchanged(norm):
    case = tiny_case(norm)
    before = model_snapshot(case.model)
    radial_tangential(case.model, loss_fn=case.loss_fn, data=(case.x, case.y))
    minibatch_gradient(case.model, case.loss_fn, case.x, case.y)
    assert_unchanged(before, case.model)


def test_bad_settings_are_named():
    case = tiny_case("none")
    with pytest.raises(ConfigError, match="granularity"):
        radial_tangential(case.model, grads={}, granularity="row")
    with pytest.raises(ValueError, match="loss_fn"):
        radial_tangential(case.model)


def test_radial_callback_logs_layer_records():
    from types import SimpleNamespace

    from normlab.runs.tasks import RunContext
    from normlab.train.callbacks import scheduled

    case = _exact_bn(tiny_case("batch"))
    context = RunContext()
    callback = scheduled("radial", every=2)
    for step in (0, 1, 2):
        callback(SimpleNamespace(model=case.model, loss_fn=case.loss_fn, x=case.x, y=case.y,
                                 lr=0.1, step=step, context=context))
    steps = {r["step"] for r in context.records}
    assert steps == {0, 2}
    shares = [r["value"] for r in context.records
              if r["quantity"] == "radial_share" and r["layer"] == "conv1"]
    assert max(shares) < 1e-5


def test_documentation_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "probes_radial_curvature.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(block, "docs/probes_radial_curvature.md", "exec"), {})
