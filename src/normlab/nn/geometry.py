"""Radial and tangential parts of a vector relative to a weight tensor, per filter or per layer.

For a weight w and a vector g (a gradient, an update, a direction):
    g_rad = (<g, w> / ||w||^2) w,    g_tan = g - g_rad.
"Filter" granularity treats each output unit separately: the unit that a following BatchNorm
makes scale-invariant. That is dim 0 of a conv or linear weight, and dim 1 of a transposed
convolution's weight (shape (in, out / groups, ...)), whose units are found from `module`.
A zero filter has no radial direction; its radial part is defined as 0.
"""

from __future__ import annotations

import torch
from torch import nn

GRANULARITIES = ("filter", "layer")


def _transposed_groups(module: nn.Module | None) -> int | None:
    """The groups of a transposed convolution (whose units are weight dim 1), else None."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return module.groups
    return None


def _rows(t: torch.Tensor, granularity: str, module: nn.Module | None = None) -> torch.Tensor:
    """(units, numbers per unit): one row per output unit ("filter") or one row ("layer")."""
    if granularity == "filter":
        if t.dim() < 2:
            return t.reshape(-1, 1)
        groups = _transposed_groups(module)
        if groups is None:
            return t.reshape(t.shape[0], -1)
        g, fan_in, out = groups, t.shape[0] // groups, t.shape[1]
        return t.reshape(g, fan_in, out, -1).permute(0, 2, 1, 3).reshape(g * out, -1)
    if granularity == "layer":
        return t.reshape(1, -1)
    raise ValueError(f"The 'granularity' setting must be one of {GRANULARITIES}; "
                     f"got {granularity!r}.")


def _unrows(rows: torch.Tensor, shape: torch.Size, granularity: str,
            module: nn.Module | None = None) -> torch.Tensor:
    """The inverse of `_rows`: rows back to a tensor of `shape`."""
    groups = _transposed_groups(module) if granularity == "filter" and len(shape) >= 2 else None
    if groups is None:
        return rows.reshape(shape)
    g, fan_in, out = groups, shape[0] // groups, shape[1]
    return rows.reshape(g, out, fan_in, -1).permute(0, 2, 1, 3).reshape(shape)


def radial_coefficients(g: torch.Tensor, w: torch.Tensor, granularity: str = "filter",
                        module: nn.Module | None = None) -> torch.Tensor:
    """<g, w> / ||w||^2 per filter (shape (units,)) or per layer (shape (1,)); 0 where w = 0."""
    g_rows, w_rows = _rows(g, granularity, module), _rows(w, granularity, module)
    sq_norm = (w_rows * w_rows).sum(dim=1)
    dot = (g_rows * w_rows).sum(dim=1)
    return torch.where(sq_norm > 0, dot / sq_norm.clamp_min(torch.finfo(w.dtype).tiny),
                       torch.zeros_like(dot))


def radial_part(g: torch.Tensor, w: torch.Tensor, granularity: str = "filter",
                module: nn.Module | None = None) -> torch.Tensor:
    """(<g, w> / ||w||^2) w, per filter or per layer, shaped like g."""
    coef = radial_coefficients(g, w, granularity, module)
    return _unrows(coef[:, None] * _rows(w, granularity, module), g.shape, granularity, module)


def tangential_part(g: torch.Tensor, w: torch.Tensor, granularity: str = "filter",
                    module: nn.Module | None = None) -> torch.Tensor:
    """g minus its radial part: the component along the sphere of constant ||w||."""
    return g - radial_part(g, w, granularity, module)
