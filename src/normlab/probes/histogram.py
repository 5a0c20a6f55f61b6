"""Gradient histograms and their tails (E3): Gaussian-like with BN, heavy-tailed without.

Tail statistics of a set of values:
- excess kurtosis E[(v - mean)^4] / var^2 - 3 (0 for a Gaussian; population moments);
- Hill tail index of |v|: with |v| sorted decreasingly X_(1) >= X_(2) >= ...,
  alpha = k / sum_{i=1..k} ln(X_(i) / X_(k+1)), using the k = ceil(sqrt(n)) largest values by
  default. A Pareto tail P(|v| > t) ~ t^(-alpha) gives alpha; smaller alpha is a heavier tail, and
  for Gaussian data the estimate is large and grows slowly with n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from normlab.probes._calling import batch_loss, convention, one_batch
from normlab.probes._hygiene import preserved
from normlab.probes._modes import norm_mode, probe_mode
from normlab.probes._modules import (
    hooks_removed,
    parametrization_outputs,
    select_layers,
    tensor_used,
)
from normlab.probes._results import Records, all_finite, flagged
from normlab.probes._stateless import Stateless, leaves
from normlab.utils.config import ConfigError, check_interval


def tail_statistics(values: torch.Tensor, k: int | None = None) -> dict[str, float]:
    """Excess kurtosis and the Hill tail index (with its k) of a tensor's entries; plus min, max,
    std and range (max - min)."""
    v = values.detach().reshape(-1).double()
    n = v.numel()
    if n < 3:
        raise ConfigError(f"The 'values' setting must hold at least 3 numbers; got {n}.")
    if k is None:
        k = min(n - 1, math.ceil(math.sqrt(n)))
    check_interval("k", k, 1, n - 1, kind=int, low_open=False, high_open=False)
    centred = v - v.mean()
    var = (centred ** 2).mean()
    kurt = ((centred ** 4).mean() / var ** 2 - 3).item() if var > 0 else float("nan")
    top = v.abs().sort(descending=True).values[: k + 1]
    hill = (k / (top[:k] / top[k]).log().sum()).item() if top[k] > 0 else float("nan")
    return {"excess_kurtosis": kurt, "hill_tail_index": hill, "hill_k": k,
            "min": v.min().item(), "max": v.max().item(), "std": var.sqrt().item(),
            "range": (v.max() - v.min()).item()}


@convention(old_positional=("layers", "bins"))
def gradient_histogram(model: nn.Module, loss_fn, data, *,
                       layers: Sequence[str | int] | None = None, bins: int = 60,
                       mode: str = "keep") -> Records:
    """Histogram and tail statistics of the entries of the mini-batch gradient of each chosen
    layer's weight on one batch `data` = (x, y), in `mode` ("keep": the model's own modes);
    cost: one forward and backward.

    The gradient is that of `loss_fn` as given (mean-reduced for the usual losses). Bins are
    `bins` equal-width bins spanning [min, max] of each layer's entries. Records per layer:
    quantity "count" (with bin_low, bin_high) and one record per tail statistic (see
    `tail_statistics`); all with layer, depth, bn_mode, gradient="batch_gradient".
    Running statistics and parameters are never written.
    """
    check_interval("bins", bins, 1, kind=int, low_open=False)
    x, y = one_batch(data, "gradient_histogram")
    with preserved(model), probe_mode(model, mode, x):
        chosen = select_layers(model, layers, kinds=(nn.Conv2d, nn.Linear))
        grads, loss = _weight_gradients(model, loss_fn, x, y, [layer.module for layer in chosen])
        measured = norm_mode(model, mode, x)
        records = []
        for layer, g in zip(chosen, grads, strict=True):
            if g is None:
                continue
            base = {"layer": layer.name, "depth": layer.depth, "bn_mode": measured,
                    "mode": mode, "gradient": "batch_gradient"}
            v = g.detach().reshape(-1).double()
            low, high = v.min().item(), v.max().item()
            if high == low:
                high = low + 1.0
            counts = torch.histc(v, bins=bins, min=low, max=high).tolist()
            edges = torch.linspace(low, high, bins + 1, dtype=torch.float64).tolist()
            records += [{**base, "quantity": "count", "bin_low": edges[i],
                         "bin_high": edges[i + 1], "value": c} for i, c in enumerate(counts)]
            stats = tail_statistics(v) if v.numel() >= 3 else {}
            k = stats.pop("hill_k", None)
            records += [{**base, "quantity": q, "value": val, "hill_k": k}
                        for q, val in stats.items()]
        return flagged(records, all_finite([x, loss]))


def _weight_gradients(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                      modules: list[nn.Module]) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """d loss / d (the weight each module's forward used), summed over its calls (the weight
    parameter, or the tensor its parametrization such as weight_norm computed; None if
    unused), and the loss."""
    names = {id(p): n for n, p in model.named_parameters()}
    own = {names[id(p)]: p for m in modules for p in m.parameters()}  # frozen ones included
    used: list[tuple[int, torch.Tensor | None]] = []

    def record(k: int, latest: dict):
        return lambda module, _inputs, _output: used.append(
            (k, tensor_used(module, "weight", latest)))

    with parametrization_outputs(modules) as latest:
        handles = [m.register_forward_hook(record(k, latest)) for k, m in enumerate(modules)]
        with hooks_removed(handles):
            loss = batch_loss(loss_fn, Stateless(model)(x, leaves(own)), y)
    unique = {(k, id(w)): (k, w) for k, w in used if w is not None and w.requires_grad}
    wanted = list(unique.values())  # a parameter once per module, each computed weight
    got = torch.autograd.grad(loss, [w for _, w in wanted], allow_unused=True)
    grads: list[torch.Tensor | None] = [None] * len(modules)
    for (k, _), g in zip(wanted, got, strict=True):
        if g is not None:
            grads[k] = g if grads[k] is None else grads[k] + g
    return grads, loss
