"""Radial and tangential parts of a gradient (or any direction) per weight layer and per filter.

For a conv or linear weight w and a direction g: g_rad = (<g, w>/||w||^2) w, g_tan = g - g_rad
(`probes._geometry`). A weight whose output is followed by BatchNorm is scale-invariant,
L(c w) = L(w), so its loss gradient is purely tangential; nothing forces that without a norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normlab.config import check_choice
from normlab.probes._batches import LossFn, Vector
from normlab.probes._geometry import GRANULARITIES, _rows, radial_part
from normlab.probes._hygiene import bn_mode, frozen_norm_statistics, preserved
from normlab.probes._modules import weight_layers
from normlab.train.callbacks import TrainState, register_callback


def minibatch_gradient(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
                       ) -> Vector:
    """d loss_fn(model(x), y) / d theta in the model's current mode (running stats frozen);
    one forward and backward; the model is restored."""
    with preserved(model), frozen_norm_statistics(model):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)).detach()
            for (n, p), g in zip(params.items(), grads, strict=True)}


def _quantities(g: torch.Tensor, w: torch.Tensor, granularity: str) -> dict[str, torch.Tensor]:
    """Per row (filter or layer): norms of w, g, g_rad, g_tan, and cos(g, w)."""
    g_rad = radial_part(g, w, granularity)
    rows = {"weight_norm": _rows(w, granularity), "grad_norm": _rows(g, granularity),
            "radial_norm": _rows(g_rad, granularity), "tangential_norm": _rows(g - g_rad,
                                                                               granularity)}
    out = {k: v.double().norm(dim=1) for k, v in rows.items()}
    dots = (_rows(g, granularity).double() * _rows(w, granularity).double()).sum(1)
    denominator = out["grad_norm"] * out["weight_norm"]
    out["cosine"] = torch.where(denominator > 0, dots / denominator.clamp_min(1e-300),
                                torch.zeros_like(dots))
    return out


def radial_tangential(model: nn.Module, grads: Vector | None = None, granularity: str = "filter",
                      lr: float | None = None, loss_fn: LossFn | None = None,
                      x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                      source: str = "minibatch_gradient") -> list[dict[str, Any]]:
    """Norms of the radial and tangential parts of `grads` for each conv/linear weight (per
    output filter or per layer), their ratio, cos(g, w), ||w|| and the effective lr lr/||w||^2.

    `grads` (parameter name -> tensor) may be a mini-batch gradient, a mean gradient or any
    direction; without it the gradient of loss_fn(model(x), y) is taken in the model's current
    BN mode (one forward + backward, running statistics frozen). Records carry `bn_mode`, the
    `source` label and `granularity`; `radial_share` is ||g_rad|| / ||g||.

    Note: weight decay is not part of the loss here; its gradient (lambda w) is purely radial.
    """
    check_choice("granularity", granularity, GRANULARITIES)
    mode = bn_mode(model)
    if grads is None:
        if loss_fn is None or x is None or y is None:
            raise ValueError("radial_tangential needs `grads` or all of `loss_fn`, `x` and `y`.")
        grads = minibatch_gradient(model, loss_fn, x, y)
    records = []
    for layer in weight_layers(model):
        name, depth, module = layer.name, layer.depth, layer.module
        key = f"{name}.weight" if name else "weight"
        if key not in grads:
            continue
        w, g = module.weight.detach(), grads[key].detach().to(module.weight.dtype)
        values = _quantities(g, w, granularity)
        values["ratio"] = values["radial_norm"] / values["tangential_norm"].clamp_min(1e-300)
        values["radial_share"] = torch.where(
            values["grad_norm"] > 0, values["radial_norm"] / values["grad_norm"].clamp_min(1e-300),
            torch.zeros_like(values["grad_norm"]))
        if lr is not None:
            values["effective_lr"] = lr / (values["weight_norm"] ** 2).clamp_min(1e-300)
        for quantity, column in values.items():
            for row, value in enumerate(column.tolist()):
                record = {"layer": name, "depth": depth, "quantity": quantity, "value": value,
                          "granularity": granularity, "source": source, "bn_mode": mode}
                if granularity == "filter":
                    record["channel"] = row
                records.append(record)
    return records


def radial_share_total(model: nn.Module, grads: Vector) -> float:
    """||g_rad|| / ||g|| over all conv/linear weights together, filter by filter (one number)."""
    radial_sq = total_sq = 0.0
    for layer in weight_layers(model):
        key = f"{layer.name}.weight" if layer.name else "weight"
        if key in grads:
            g = grads[key].double()
            radial_sq += float(radial_part(g, layer.module.weight.detach().double()).pow(2).sum())
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
        rows = radial_tangential(state.model, granularity=granularity, lr=state.lr,
                                 loss_fn=state.loss_fn, x=state.x, y=state.y)
        state.context.log_records("radial", rows, step=state.step, lr=state.lr)

    return callback
