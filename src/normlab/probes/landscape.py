"""Loss along 1-D and 2-D slices of parameter space, and the directions that span them.

A direction is a dict parameter name -> tensor (names left out move nothing). Builders:
`random_direction` (Gaussian, filter-normalized after Li et al. 2018, optionally orthogonal to
another direction), `scaled_direction` (any direction rescaled, e.g. a mean gradient),
`radial_direction` / `tangential_direction` (the parts of a gradient per filter) and
`hessian_direction` (the top Hessian eigenvector).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.config import ConfigError, check_interval
from normlab.probes._batches import (
    Batch,
    LossFn,
    Vector,
    as_batches,
    dot,
    mean_loss,
    norm,
    set_bn_mode,
)
from normlab.probes._geometry import radial_part
from normlab.probes._hygiene import frozen_norm_statistics, preserved
from normlab.probes._modules import weight_layers


def _weight_names(model: nn.Module) -> list[str]:
    return [f"{layer.name}.weight" for layer in weight_layers(model)]


def _filter_normalized(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each filter of d rescaled to the norm of the same filter of w (0 where either is 0)."""
    d_rows, w_rows = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
    d_norm, w_norm = d_rows.norm(dim=1, keepdim=True), w_rows.norm(dim=1, keepdim=True)
    scale = torch.where(d_norm > 0, w_norm / d_norm.clamp_min(torch.finfo(d.dtype).tiny),
                        torch.zeros_like(d_norm))
    return (d_rows * scale).reshape(d.shape)


def random_direction(model: nn.Module, seed: int = 0, orthogonal_to: Vector | None = None,
                     include_1d: bool = False) -> Vector:
    """A Gaussian direction, filter-normalized (each filter as long as the weight's filter).

    1-D parameters (biases, norm affine parameters) get 0 unless `include_1d`, in which case
    each entry is scaled to |w_i| (so zero-initialized BN biases get 0, never NaN). With
    `orthogonal_to`, the component along that direction is removed and the result rescaled to
    its filter-normalized length; filter norms then match ||w|| only approximately.
    """
    generator = torch.Generator().manual_seed(seed)
    direction = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or (p.dim() < 2 and not include_1d):
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        w = p.detach().double().cpu()
        d = _filter_normalized(d, w) if p.dim() >= 2 else d.sign() * w.abs()
        direction[name] = d.to(p.dtype).to(p.device)
    if orthogonal_to is not None:
        length = norm(direction)
        other_sq = dot(orthogonal_to, orthogonal_to)
        if other_sq > 0:
            coef = dot(direction, orthogonal_to) / other_sq
            direction = {n: d - coef * orthogonal_to[n].to(d.dtype) if n in orthogonal_to else d
                         for n, d in direction.items()}
        new_length = norm(direction)
        if new_length > 0:
            direction = {n: d * (length / new_length) for n, d in direction.items()}
    return direction


def scaled_direction(model: nn.Module, direction: Vector, scale: str = "weights") -> Vector:
    """`direction` rescaled: "weights" to the norm of the conv/linear weights it touches
    (so that alpha = 1 is a move as long as those weights), "unit" to norm 1."""
    length = norm(direction)
    if length == 0:
        raise ConfigError("The 'direction' setting must be a non-zero vector; got all zeros.")
    if scale == "unit":
        target = 1.0
    elif scale == "weights":
        params = dict(model.named_parameters())
        target = norm({n: params[n].detach() for n in direction if n in params}) or 1.0
    else:
        raise ConfigError.choice("scale", scale, ["weights", "unit"])
    return {n: d * (target / length) for n, d in direction.items()}


def radial_direction(model: nn.Module, grads: Vector, granularity: str = "filter") -> Vector:
    """The radial part of `grads` for every conv/linear weight (other parameters left out)."""
    params = dict(model.named_parameters())
    return {n: radial_part(grads[n], params[n].detach(), granularity)
            for n in _weight_names(model) if n in grads}


def tangential_direction(model: nn.Module, grads: Vector, granularity: str = "filter") -> Vector:
    """The tangential part of `grads` for every conv/linear weight (other parameters left out)."""
    radial = radial_direction(model, grads, granularity)
    return {n: grads[n] - r for n, r in radial.items()}


def hessian_direction(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch],
                      bn_mode: str = "train") -> Vector:
    """The top eigenvector (unit norm) of the loss Hessian on `data` (see `hessian_eigs`)."""
    from normlab.probes.curvature import hessian_eigs

    return hessian_eigs(model, loss_fn, data, k=1, bn_mode=bn_mode).vectors[0]


def _span_grid(span: float | Sequence[float], points: int) -> np.ndarray:
    low, high = (-float(span), float(span)) if np.isscalar(span) else map(float, span)
    if not high > low:
        raise ConfigError(f"The 'span' setting must be a positive number or (low, high) with "
                          f"low < high; got {span!r}.")
    return np.linspace(low, high, points)


def landscape(model: nn.Module, loss_fn: LossFn, batches: Batch | Iterable[Batch],
              directions: Sequence[Vector], span: float | Sequence[float] = 1.0,
              points: int = 21, bn_mode: str = "train", labels: Sequence[str] | None = None
              ) -> list[dict[str, Any]]:
    """Mean loss over fixed `batches` at theta + alpha d1 (+ beta d2) on a `points`-per-axis grid
    over `span`, in `bn_mode` ("train": each batch normalized with its own statistics, running
    statistics frozen; "eval": running statistics). Costs points (1-D) or points^2 (2-D)
    forward passes per batch; the model is restored.

    Records: alpha (and beta), quantity "loss", value, bn_mode, direction labels.
    """
    if len(directions) not in (1, 2):
        raise ConfigError(f"The 'directions' setting must hold 1 or 2 directions; got "
                          f"{len(directions)}.")
    check_interval("points", points, 2, float("inf"), kind=int, low_open=False)
    labels = list(labels or [f"d{i + 1}" for i in range(len(directions))])
    grid = _span_grid(span, points)
    batches = as_batches(batches)
    records = []
    with preserved(model), torch.no_grad():
        set_bn_mode(model, bn_mode)
        params = dict(model.named_parameters())
        origin = {n: p.detach().clone() for n, p in params.items()}
        second = grid if len(directions) == 2 else [0.0]
        with frozen_norm_statistics(model):
            for alpha in grid:
                for beta in second:
                    for name, p in params.items():
                        move = origin[name]
                        if name in directions[0]:
                            move = move + alpha * directions[0][name].to(p.dtype)
                        if len(directions) == 2 and name in directions[1]:
                            move = move + beta * directions[1][name].to(p.dtype)
                        p.copy_(move)
                    loss = float(mean_loss(model, loss_fn, batches))
                    row = {"alpha": float(alpha), "quantity": "loss", "value": loss,
                           "bn_mode": bn_mode, "direction": labels[0]}
                    if len(directions) == 2:
                        row.update(beta=float(beta), direction2=labels[1])
                    records.append(row)
    return records
