"""The data-independent gradient component: the gradient averaged over many mini-batches.

Each batch's gradient is taken in train mode (batch statistics; running statistics frozen)
at the same parameters; their plain average estimates E_B[g_B]. Its stability is the cosine
between the averages of two disjoint halves of the batches (even- and odd-numbered); its
radial share says whether it points along the weights (R2, R4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from normlab.probes._batches import Batch, LossFn, Vector, dot, norm
from normlab.probes._calling import batch_list, convention
from normlab.probes._hygiene import preserved
from normlab.probes._modes import norm_mode, probe_mode
from normlab.probes._results import Records, RecordsMixin, all_finite
from normlab.probes.per_example import per_example_loss_grads
from normlab.probes.radial import minibatch_gradient, radial_share_total, radial_tangential
from normlab.probes.spectrum import gradient_spectrum
from normlab.utils.config import ConfigError


@dataclass
class MeanGradient(RecordsMixin):
    """The mean gradient (`gradient`, name -> tensor), its split-half `stability`, the radial
    share over all conv/linear weights, and per-layer records (radial/tangential quantities,
    and where asked the cosine with the top singular direction of per-example gradients):
    `records()` (also readable as the list `records`, the old form) and `to_frame()`."""

    gradient: Vector
    stability: float
    radial_share: float
    batches: int
    bn_mode: str
    records: Records = field(default_factory=Records)  # type: ignore[assignment]
    finite: bool = True
    mode: str = "train"


def _average(grads: list[Vector]) -> Vector:
    return {n: sum(g[n] for g in grads) / len(grads) for n in grads[0]}


def _cosine(a: Vector, b: Vector) -> float:
    na, nb = norm(a), norm(b)
    return dot(a, b) / (na * nb) if na > 0 and nb > 0 else math.nan


@convention(old_positional=("spectrum_batch",))
def mean_gradient(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch], *,
                  spectrum_batch: Batch | None = None, mode: str = "train") -> MeanGradient:
    """Average of the mini-batch loss gradients over the batches of `data` (at least 2) in
    `mode` (default "train": normalization layers on batch statistics, Dropout off; running
    statistics and parameters never written), its split-half stability, radial share and
    per-layer radial/tangential records; costs one forward + backward per batch.

    With `spectrum_batch` = (x, y), also the per-layer cosine between the mean gradient and the
    top right-singular vector of that batch's exact per-example loss gradients
    (`gradient_spectrum`; B backward passes under BN in train mode).

    Notes: batches are weighted equally (the mean of mean-reduced losses); the weight-decay
    gradient (purely radial) is not included.
    """
    batches = batch_list(data, "mean_gradient")
    if len(batches) < 2:
        raise ConfigError(f"The 'data' setting of mean_gradient must hold at least 2 batches "
                          f"(two halves are compared); got {len(batches)}.")
    with preserved(model), probe_mode(model, mode, batches[0][0]):
        measured = norm_mode(model, mode, batches[0][0])
        grads = [minibatch_gradient(model, loss_fn, x, y) for x, y in batches]
        mean = _average(grads)
        stability = _cosine(_average(grads[0::2]), _average(grads[1::2]))
        records = radial_tangential(model, grads=mean, granularity="layer",
                                    source="mean_gradient", mode=mode)
        for record in records:
            record.update(batches=len(batches), bn_mode=measured)
        if spectrum_batch is not None:
            records += _top_direction_cosines(model, loss_fn, spectrum_batch, mean)
        share = radial_share_total(model, mean)
    finite = all_finite(mean.values())
    return MeanGradient(mean, stability, share, len(batches), measured, Records(records), finite,
                        mode)


def _top_direction_cosines(model: nn.Module, loss_fn: LossFn, batch: Batch, mean: Vector
                           ) -> list[dict[str, Any]]:
    x, y = batch
    per_example = per_example_loss_grads(model, loss_fn, (x, y))
    spectrum, directions = gradient_spectrum(per_example, return_directions=True)
    depths = {r["layer"]: r["depth"] for r in spectrum}
    rows = []
    for layer, top in directions.items():
        piece = {n: mean[n].double() for n in top}
        rows.append({"layer": layer, "depth": depths.get(layer),
                     "quantity": "top_singular_cosine",
                     "value": abs(_cosine(piece, {n: t.double() for n, t in top.items()})),
                     "gradient": per_example.quantity, "source": "mean_gradient",
                     "bn_mode": per_example.bn_mode, "batch": int(x.shape[0])})
    return rows


def mean_gradient_direction(result: MeanGradient) -> Vector:
    """The descent direction -mean gradient, detached (for `landscape`)."""
    return {n: -g.detach().clone() for n, g in result.gradient.items()}


__all__ = ["MeanGradient", "mean_gradient", "mean_gradient_direction"]
