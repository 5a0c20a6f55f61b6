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

from normlab.probes._hygiene import bn_mode, frozen_norm_statistics, preserved
from normlab.probes._modules import hooks_removed, padded_conv_input, select_layers
from normlab.train.callbacks import TrainState, register_callback


def gradient_coherence(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                       layers: Sequence[str | int] | None = None) -> list[dict]:
    """|sum of terms| / sum |terms| per weight entry of Conv2d (and Linear) layers, aggregated
    over entries (median, mean); in the model's current BN mode; cost: one forward and backward
    plus two weight-gradient ops per layer.

    The terms are those of the gradient of `loss_fn` on the batch (its reduction scales numerator
    and denominator alike, so the ratio does not depend on it). Entries whose terms are all zero
    (sum |terms| = 0) are left out of the aggregates; `entries` counts those kept.
    Records: layer, depth, quantity ("coherence_median", "coherence_mean", "abs_sum_median"),
    value, bn_mode, entries, gradient="batch_gradient_terms".
    """
    with preserved(model), frozen_norm_statistics(model):
        chosen = select_layers(model, layers, kinds=(nn.Conv2d, nn.Linear))
        for layer in chosen:  # frozen layers have gradient terms too (flags are restored)
            layer.module.weight.requires_grad_(True)
        captured: dict[str, list[torch.Tensor]] = {}

        def capture(name: str):
            def hook(module, inputs, output):
                a = inputs[0].detach()

                def keep(d: torch.Tensor) -> None:  # first call of the layer only
                    captured.setdefault(name, [a, d.detach()])

                output.register_hook(keep)

            return hook

        handles = [layer.module.register_forward_hook(capture(layer.name)) for layer in chosen]
        with hooks_removed(handles):
            loss = loss_fn(model(x), y)
            weights = [layer.module.weight for layer in chosen]
            torch.autograd.grad(loss, weights, allow_unused=True)
        mode = bn_mode(model)
        records = []
        for layer in chosen:
            if layer.name not in captured:
                continue
            a, d = captured[layer.name]
            signed = weight_gradient(layer.module, a, d)
            magnitude = weight_gradient(layer.module, a.abs(), d.abs())
            keep = magnitude > 0
            ratio = (signed.abs()[keep] / magnitude[keep]).double()
            base = {"layer": layer.name, "depth": layer.depth, "bn_mode": mode,
                    "entries": int(keep.sum()), "gradient": "batch_gradient_terms"}
            values = {"coherence_median": ratio.median().item() if ratio.numel() else float("nan"),
                      "coherence_mean": ratio.mean().item() if ratio.numel() else float("nan"),
                      "abs_sum_median": magnitude.double().median().item()}
            records += [{**base, "quantity": q, "value": v} for q, v in values.items()]
        return records


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
        rows = gradient_coherence(state.model, state.loss_fn, state.x, state.y, layers)
        state.context.log_records("gradient_coherence", rows, step=state.step)

    return callback
