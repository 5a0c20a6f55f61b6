"""Loss along 1-D and 2-D slices of parameter space, and the directions that span them.

A direction is a dict parameter name -> tensor (names left out move nothing). Builders:
`random_direction` (Gaussian, filter-normalized after Li et al. 2018, optionally orthogonal to
another direction), `scaled_direction` (any direction rescaled, e.g. a mean gradient),
`radial_direction` / `tangential_direction` (the parts of a gradient per filter) and
`hessian_direction` (the top Hessian eigenvector).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from normlab.nn.geometry import _rows, _unrows, radial_part
from normlab.probes._batches import Batch, LossFn, Vector, dot, norm
from normlab.probes._calling import batch_list, batch_loss, convention
from normlab.probes._hygiene import preserved
from normlab.probes._modes import norm_mode, probe_mode, resolve_mode
from normlab.probes._modules import weight_layers
from normlab.probes._results import Records, flagged
from normlab.probes._stateless import Stateless
from normlab.probes.curvature import hessian_eigs
from normlab.utils.config import ConfigError, check_interval


def _weight_names(model: nn.Module) -> list[str]:
    return [f"{layer.name}.weight" for layer in weight_layers(model)]


def _owner(model: nn.Module, name: str) -> nn.Module:
    """The module holding parameter `name`."""
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _filter_normalized(d: torch.Tensor, w: torch.Tensor, module: nn.Module | None = None
                       ) -> torch.Tensor:
    """Each filter (output unit; dim 1 of a transposed convolution) of d rescaled to the norm of
    the same filter of w (0 where either is 0)."""
    d_rows, w_rows = _rows(d, "filter", module), _rows(w, "filter", module)
    d_norm, w_norm = d_rows.norm(dim=1, keepdim=True), w_rows.norm(dim=1, keepdim=True)
    scale = torch.where(d_norm > 0, w_norm / d_norm.clamp_min(torch.finfo(d.dtype).tiny),
                        torch.zeros_like(d_norm))
    return _unrows(d_rows * scale, d.shape, "filter", module)


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
        d = (_filter_normalized(d, w, _owner(model, name)) if p.dim() >= 2
             else d.sign() * w.abs())
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
    return {n: radial_part(grads[n], params[n].detach(), granularity, _owner(model, n))
            for n in _weight_names(model) if n in grads}


def tangential_direction(model: nn.Module, grads: Vector, granularity: str = "filter") -> Vector:
    """The tangential part of `grads` for every conv/linear weight (other parameters left out)."""
    radial = radial_direction(model, grads, granularity)
    return {n: grads[n] - r for n, r in radial.items()}


@convention(old_positional=("bn_mode",))
def hessian_direction(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch], *,
                      mode: str | None = None, bn_mode: str | None = None) -> Vector:
    """The top eigenvector (unit norm) of the loss Hessian on `data` (see `hessian_eigs`)."""
    mode = resolve_mode(mode, bn_mode, "train")
    return hessian_eigs(model, loss_fn, data, k=1, mode=mode).vectors[0]


def _span_grid(span: float | Sequence[float], points: int) -> np.ndarray:
    low, high = (-float(span), float(span)) if np.isscalar(span) else map(float, span)
    if not high > low:
        raise ConfigError(f"The 'span' setting must be a positive number or (low, high) with "
                          f"low < high; got {span!r}.")
    return np.linspace(low, high, points)


@convention(old_positional=("directions", "span", "points", "bn_mode", "labels"))
def landscape(model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch], *,
              directions: Sequence[Vector], span: float | Sequence[float] = 1.0,
              points: int = 21, mode: str | None = None, labels: Sequence[str] | None = None,
              bn_mode: str | None = None) -> Records:
    """Mean loss over the fixed batches of `data` at theta + alpha d1 (+ beta d2) on a
    `points`-per-axis grid over `span`, in `mode` (default "train": each batch normalized with
    its own statistics, Dropout off; "eval": running statistics; "keep"). Costs points (1-D) or
    points^2 (2-D) forward passes per batch. The perturbed weights are evaluated functionally:
    the model's parameters and running statistics are never written.

    Records: alpha (and beta), quantity "loss", value, bn_mode, mode, direction labels.
    """
    if len(directions) not in (1, 2):
        raise ConfigError(f"The 'directions' setting must hold 1 or 2 directions; got "
                          f"{len(directions)}.")
    check_interval("points", points, 2, float("inf"), kind=int, low_open=False)
    mode = resolve_mode(mode, bn_mode, "train")
    labels = list(labels or [f"d{i + 1}" for i in range(len(directions))])
    grid = _span_grid(span, points)
    batches = batch_list(data, "landscape")
    params = dict(model.named_parameters())
    for direction in directions:
        unknown = [n for n in direction if n not in params]
        if unknown:
            raise ConfigError.choice("directions", unknown[0], list(params))
    records = []
    with preserved(model), probe_mode(model, mode, batches[0][0]), torch.no_grad():
        measured = norm_mode(model, mode, batches[0][0])
        forward = Stateless(model)
        second = grid if len(directions) == 2 else [0.0]
        for alpha in grid:
            for beta in second:
                moved = {}
                for name in set(directions[0]) | (set(directions[1]) if len(directions) == 2
                                                  else set()):
                    p = params[name].detach()
                    move = p
                    if name in directions[0]:
                        move = move + alpha * directions[0][name].to(p.dtype)
                    if len(directions) == 2 and name in directions[1]:
                        move = move + beta * directions[1][name].to(p.dtype)
                    moved[name] = move
                loss = float(sum(batch_loss(loss_fn, forward(x, moved), y) for x, y in batches)
                             / len(batches))
                row = {"alpha": float(alpha), "quantity": "loss", "value": loss,
                       "bn_mode": measured, "mode": mode, "direction": labels[0]}
                if len(directions) == 2:
                    row.update(beta=float(beta), direction2=labels[1])
                records.append(row)
    return flagged(records, all(math.isfinite(r["value"]) for r in records))
