"""Radial and tangential parts of a gradient (or any direction) per weight layer and per filter.

For a conv or linear weight w and a direction g: g_rad = (<g, w>/||w||^2) w, g_tan = g - g_rad
(`nn.geometry`). A weight whose output is followed by BatchNorm is scale-invariant,
L(c w) = L(w), so its loss gradient is purely tangential; nothing forces that without a norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from normlab.nn.geometry import GRANULARITIES, _rows, radial_part
from normlab.probes._batches import LossFn, Vector
from normlab.probes._calling import batch_loss, convention, one_batch
from normlab.probes._hygiene import preserved
from normlab.probes._modes import norm_mode, probe_mode
from normlab.probes._modules import select_params, weight_layers
from normlab.probes._results import Records, all_finite, flagged
from normlab.probes._stateless import Stateless, leaves
from normlab.train.callbacks import TrainState, register_callback
from normlab.utils.config import ConfigError, check_choice


def minibatch_gradient(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
                       ) -> Vector:
    """d loss_fn(model(x), y) / d theta in the model's current modes (running statistics and
    parameters never written); one forward and backward."""
    with preserved(model):
        params = leaves(select_params(model, None))
        loss = batch_loss(loss_fn, Stateless(model)(x, params), y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)).detach()
            for (n, p), g in zip(params.items(), grads, strict=True)}


def _quantities(g: torch.Tensor, w: torch.Tensor, granularity: str, module: nn.Module
                ) -> dict[str, torch.Tensor]:
    """Per row (filter or layer): norms of w, g, g_rad, g_tan, and cos(g, w)."""
    g_rad = radial_part(g, w, granularity, module)
    rows = {"weight_norm": _rows(w, granularity, module),
            "grad_norm": _rows(g, granularity, module),
            "radial_norm": _rows(g_rad, granularity, module),
            "tangential_norm": _rows(g - g_rad, granularity, module)}
    out = {k: v.double().norm(dim=1) for k, v in rows.items()}
    dots = (_rows(g, granularity, module).double()
            * _rows(w, granularity, module).double()).sum(1)
    denominator = out["grad_norm"] * out["weight_norm"]
    out["cosine"] = torch.where(denominator > 0, dots / denominator.clamp_min(1e-300),
                                torch.zeros_like(dots))
    return out


@convention(old_positional=("lr",))
def radial_tangential(model: nn.Module, loss_fn: LossFn | None = None, data=None, *,
                      grads: Vector | None = None, granularity: str = "filter",
                      lr: float | None = None, source: str = "minibatch_gradient",
                      mode: str = "keep") -> Records:
    """Norms of the radial and tangential parts of a gradient for each conv/linear weight (per
    output filter, dim 1 of a transposed convolution, or per layer), their ratio, cos(g, w),
    ||w|| and the effective lr lr/||w||^2.

    The gradient is that of `loss_fn` on one batch `data` = (x, y) in `mode` ("keep": the
    model's own modes; one forward + backward, nothing written), or given as `grads`
    (parameter name -> tensor: a mean gradient or any direction; then loss_fn and data are not
    needed). Records carry `bn_mode`, `mode`, the `source` label and `granularity`;
    `radial_share` is ||g_rad|| / ||g||. The old form radial_tangential(model, grads,
    granularity, lr) works for one release with a DeprecationWarning (x=, y= as for every
    probe, see `probes._calling.convention`).

    Note: weight decay is not part of the loss here; its gradient (lambda w) is purely radial.
    """
    if isinstance(loss_fn, dict):
        loss_fn, data, grads, granularity = _old_form(loss_fn, data, granularity)
    check_choice("granularity", granularity, GRANULARITIES)
    if grads is None and (loss_fn is None or data is None):
        raise ConfigError("radial_tangential needs the 'loss_fn' and 'data' settings "
                          "(one (x, y) batch), or the 'grads' setting; got neither.")
    x, y = one_batch(data, "radial_tangential") if grads is None else (None, None)
    with probe_mode(model, mode, x):
        measured = norm_mode(model, mode, x)
        if grads is None:
            grads = minibatch_gradient(model, loss_fn, x, y)
    finite = all_finite(grads.values())
    records = []
    for layer in weight_layers(model):
        name, depth, module = layer.name, layer.depth, layer.module
        key = f"{name}.weight" if name else "weight"
        if key not in grads:
            continue
        w, g = module.weight.detach(), grads[key].detach().to(module.weight.dtype)
        values = _quantities(g, w, granularity, module)
        values["ratio"] = values["radial_norm"] / values["tangential_norm"].clamp_min(1e-300)
        values["radial_share"] = torch.where(
            values["grad_norm"] > 0, values["radial_norm"] / values["grad_norm"].clamp_min(1e-300),
            torch.zeros_like(values["grad_norm"]))
        if lr is not None:
            values["effective_lr"] = lr / (values["weight_norm"] ** 2).clamp_min(1e-300)
        for quantity, column in values.items():
            for row, value in enumerate(column.tolist()):
                record = {"layer": name, "depth": depth, "quantity": quantity, "value": value,
                          "granularity": granularity, "source": source, "bn_mode": measured,
                          "mode": mode}
                if granularity == "filter":
                    record["channel"] = row
                records.append(record)
    return flagged(records, finite)


def _old_form(grads: Vector, data, granularity: str):
    """radial_tangential(model, grads, granularity, lr): the gradient where the loss goes."""
    import warnings

    warnings.warn("radial_tangential(model, grads, ...) is deprecated; use "
                  "radial_tangential(model, grads=grads) or radial_tangential(model, loss_fn, "
                  "(x, y)). This form will be removed in the next release.",
                  DeprecationWarning, stacklevel=4)
    if isinstance(data, str):  # the old third positional: granularity
        granularity = data
    return None, None, grads, granularity


def radial_share_total(model: nn.Module, grads: Vector) -> float:
    """||g_rad|| / ||g|| over all conv/linear weights together, filter by filter (one number)."""
    radial_sq = total_sq = 0.0
    for layer in weight_layers(model):
        key = f"{layer.name}.weight" if layer.name else "weight"
        if key in grads:
            g = grads[key].double()
            w = layer.module.weight.detach().double()
            radial_sq += float(radial_part(g, w, module=layer.module).pow(2).sum())
            total_sq += float(g.pow(2).sum())
    return math.sqrt(radial_sq / total_sq) if total_sq > 0 else 0.0


@register_callback("radial")
def radial_callback(granularity: str = "layer") -> Callable[[TrainState], None]:
    """Radial/tangential norms of the current mini-batch's gradient (data loss, model's mode,
    running statistics frozen), per layer or per filter, with the effective lr at the step's lr.

    The gradient is recomputed at the current parameters on the step's batch: after an update
    that is the batch just used, seen from the new point. Cost: one forward + backward.
    """
    check_choice("granularity", granularity, GRANULARITIES)

    def callback(state: TrainState) -> None:
        rows = radial_tangential(state.model, state.loss_fn, (state.x, state.y),
                                 granularity=granularity, lr=state.lr)
        state.context.log_records("radial", rows, step=state.step, lr=state.lr)

    return callback
