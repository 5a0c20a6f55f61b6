"""Radial and tangential parts of a vector relative to a weight tensor, per filter or per layer.

For a weight w and a vector g (a gradient, an update, a direction):
    g_rad = (<g, w> / ||w||^2) w,    g_tan = g - g_rad.
"Filter" granularity treats each output unit (dim 0 of a conv or linear weight) separately: the
unit that a following BatchNorm makes scale-invariant. A zero filter has no radial direction;
its radial part is defined as 0.
"""

from __future__ import annotations

import torch

GRANULARITIES = ("filter", "layer")


def _rows(t: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity == "filter":
        return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    if granularity == "layer":
        return t.reshape(1, -1)
    raise ValueError(f"The 'granularity' setting must be one of {GRANULARITIES}; "
                     f"got {granularity!r}.")


def radial_coefficients(g: torch.Tensor, w: torch.Tensor, granularity: str = "filter"
                        ) -> torch.Tensor:
    """<g, w> / ||w||^2 per filter (shape (out,)) or per layer (shape (1,)); 0 where w = 0."""
    g_rows, w_rows = _rows(g, granularity), _rows(w, granularity)
    sq_norm = (w_rows * w_rows).sum(dim=1)
    dot = (g_rows * w_rows).sum(dim=1)
    return torch.where(sq_norm > 0, dot / sq_norm.clamp_min(torch.finfo(w.dtype).tiny),
                       torch.zeros_like(dot))


def radial_part(g: torch.Tensor, w: torch.Tensor, granularity: str = "filter") -> torch.Tensor:
    """(<g, w> / ||w||^2) w, per filter or per layer, shaped like g."""
    coef = radial_coefficients(g, w, granularity)
    return (coef[:, None] * _rows(w, granularity)).reshape(g.shape)


def tangential_part(g: torch.Tensor, w: torch.Tensor, granularity: str = "filter"
                    ) -> torch.Tensor:
    """g minus its radial part: the component along the sphere of constant ||w||."""
    return g - radial_part(g, w, granularity)
