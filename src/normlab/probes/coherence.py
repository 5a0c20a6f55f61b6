"""Gradient coherence (the paper's Table 1, E8): do the terms of a weight gradient cancel?

A conv kernel's gradient entry (o, i, x, y) is a sum over batch b and positions (w, h) of terms
d[b,o,w,h] * a[b,i,w+x,h+y] (output gradient times input activation). The coherence of the entry
is |sum of terms| / sum of |terms|: 1 when all terms share a sign (data-independent gradient),
near 0 when they cancel. sum |d * a| = sum |d| * |a|, so the denominator is the same
weight-gradient operation applied to |d| and |a|: no term is ever enumerated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.grad import conv2d_weight

from normlab.probes._calling import batch_loss, convention, one_batch
from normlab.probes._hygiene import preserved
from normlab.probes._modes import norm_mode, probe_mode
from normlab.probes._modules import hooks_removed, padded_conv_input, select_layers
from normlab.probes._results import Records, all_finite, flagged
from normlab.probes._stateless import Stateless, leaves
from normlab.train.callbacks import TrainState, register_callback


@convention(old_positional=("layers",))
def gradient_coherence(model: nn.Module, loss_fn, data, *,
                       layers: Sequence[str | int] | None = None, mode: str = "keep"
                       ) -> Records:
    """|sum of terms| / sum |terms| per weight entry of Conv2d (and Linear) layers, aggregated
    over entries (median, mean), on one batch `data` = (x, y) in `mode` ("keep": the model's own
    modes); cost: one forward and backward plus two weight-gradient ops per layer call.

    The terms are those of the gradient of `loss_fn` on the batch (its reduction scales numerator
    and denominator alike, so the ratio does not depend on it). Entries whose terms are all zero
    (sum |terms| = 0) are left out of the aggregates; `entries` counts those kept.
    Records: layer, depth, quantity ("coherence_median", "coherence_mean", "abs_sum_median"),
    value, bn_mode, entries, gradient="batch_gradient_terms".
    """
    x, y = one_batch(data, "gradient_coherence")
    with preserved(model), probe_mode(model, mode, x):
        measured = norm_mode(model, mode, x)
        chosen = select_layers(model, layers, kinds=(nn.Conv2d, nn.Linear))
        names = {id(p): n for n, p in model.named_parameters()}
        # frozen layers have gradient terms too: differentiate w.r.t. detached leaves of every
        # parameter of the chosen layers (a parametrized weight's originals included)
        params = leaves({names[id(p)]: p for layer in chosen for p in layer.module.parameters()})
        signed: dict[str, torch.Tensor] = {}
        magnitude: dict[str, torch.Tensor] = {}

        def capture(name: str):
            def hook(module, inputs, output):
                a = inputs[0].detach()

                def add(d: torch.Tensor) -> None:  # every call of the layer adds its terms
                    d = d.detach()
                    for sums, value in ((signed, weight_gradient(module, a, d)),
                                        (magnitude, weight_gradient(module, a.abs(), d.abs()))):
                        sums[name] = sums[name] + value if name in sums else value

                output.register_hook(add)

            return hook

        # first in line: the terms are those of the layer, before a user hook changes its output
        handles = [layer.module.register_forward_hook(capture(layer.name), prepend=True)
                   for layer in chosen]
        with hooks_removed(handles):
            loss = batch_loss(loss_fn, Stateless(model)(x, params), y)
            torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        records = []
        for layer in chosen:
            if layer.name not in signed:
                continue
            keep = magnitude[layer.name] > 0
            ratio = (signed[layer.name].abs()[keep] / magnitude[layer.name][keep]).double()
            base = {"layer": layer.name, "depth": layer.depth, "bn_mode": measured, "mode": mode,
                    "entries": int(keep.sum()), "gradient": "batch_gradient_terms"}
            values = {"coherence_median": ratio.median().item() if ratio.numel() else float("nan"),
                      "coherence_mean": ratio.mean().item() if ratio.numel() else float("nan"),
                      "abs_sum_median": magnitude[layer.name].double().median().item()}
            records += [{**base, "quantity": q, "value": v} for q, v in values.items()]
        return flagged(records, all_finite([x, loss]))


def weight_gradient(module: nn.Module, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum over batch and positions of d (x) a: the weight gradient of a Conv2d or Linear layer
    whose input is `a` and output gradient `d` (same shape as the layer's weight)."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            a, padding = padded_conv_input(module, a), 0
        else:
            padding = module.padding
        return conv2d_weight(a, module.weight.shape, d, stride=module.stride, padding=padding,
                             dilation=module.dilation, groups=module.groups)
    a2 = a.reshape(-1, a.shape[-1])  # (B * positions, in)
    d2 = d.reshape(-1, d.shape[-1])  # (B * positions, out)
    return d2.T @ a2


@register_callback("gradient_coherence")
def gradient_coherence_callback(layers: Sequence[str | int] | None = None):
    """Log `gradient_coherence` on the current mini-batch (records tagged with the step)."""

    def callback(state: TrainState) -> None:
        rows = gradient_coherence(state.model, state.loss_fn, (state.x, state.y), layers=layers)
        state.context.log_records("gradient_coherence", rows, step=state.step)

    return callback
