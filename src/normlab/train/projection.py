"""Update projection: keep only the tangential (or radial) part of each weight update (R4).

With `RunSpec.update_projection` = "tangential" the trainer replaces the whole update of every
conv and linear weight, delta = w_after_step - w_before (gradient, momentum and weight decay
together), by its tangential part relative to w_before, per output filter (dim 0):

    w_new = w_before + tangential_part(delta, w_before)     (or radial_part for "radial")

A tangential update is orthogonal to each filter, so ||w_new||^2 = ||w_before||^2 + ||d_t||^2
exactly: the filter norm changes only by the second-order amount ||d_t||^2. A radial update
changes only the filter's length, never its direction. Biases and normalization affine
parameters (1-D tensors) are left untouched: the hypothesis is about the weights whose output
a normalization makes scale-invariant. Cost: one copy of the projected weights per step plus a
few reductions per filter.

Note: the optimizer's momentum buffer still holds the unprojected gradient history; only the
applied update is projected.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.nn.geometry import radial_part, tangential_part
from normlab.utils.config import check_choice

PROJECTIONS = ("none", "tangential", "radial")


def projected_weights(model: nn.Module) -> list[torch.nn.Parameter]:
    """The conv and linear weights an update projection acts on (forward order of modules)."""
    return [m.weight for m in model.modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]


class UpdateProjection:
    """Snapshot the weights before an optimizer step (`before()`), project the update after
    (`after()`). A no-op object for projection "none".
    """

    def __init__(self, model: nn.Module, projection: str) -> None:
        check_choice("update_projection", projection, PROJECTIONS)
        self.projection = projection
        self.weights = projected_weights(model) if projection != "none" else []
        self._saved: list[torch.Tensor] = []

    def before(self) -> None:
        self._saved = [w.detach().clone() for w in self.weights]

    @torch.no_grad()
    def after(self) -> None:
        part = tangential_part if self.projection == "tangential" else radial_part
        for w, w_before in zip(self.weights, self._saved, strict=True):
            delta = w - w_before
            w.copy_(w_before + part(delta, w_before, "filter"))
        self._saved = []
