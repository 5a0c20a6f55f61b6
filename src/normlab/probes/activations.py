"""Per-channel activation statistics: signal propagation through depth (E5, E6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from normlab.probes._calling import convention, inputs_of
from normlab.probes._hygiene import preserved
from normlab.probes._modes import norm_mode, probe_mode
from normlab.probes._modules import hooks_removed, select_layers
from normlab.probes._results import Records, all_finite, flagged
from normlab.probes._stateless import Stateless
from normlab.train.callbacks import TrainState, register_callback

QUANTITIES = ("mean", "variance", "squared_mean")


@convention(old_positional=("layers",), takes_loss=False)
def activation_stats(model: nn.Module, data, *, layers: Sequence[str | int] | None = None,
                     mode: str = "keep") -> Records:
    """Per-channel mean, variance and squared mean of layer outputs over batch and positions,
    on `data` (x, or an (x, y) batch: no loss is needed) in `mode` ("keep": the model's own
    modes); cost: one forward pass without gradients.

    `layers`: module names or weight-layer depths (default: every Conv2d/Linear layer; their
    outputs are pre-normalization). The channel is dim 1 (the feature dim for (B, F) outputs).
    variance is the population variance (divide by count), so squared_mean = variance + mean^2.
    Records: layer, depth, channel, quantity, value, bn_mode, mode. Hooks are removed even on
    error; running statistics are not updated.
    """
    x = inputs_of(data, "activation_stats")
    with preserved(model), probe_mode(model, mode, x):
        chosen = select_layers(model, layers)
        stats: dict[str, torch.Tensor] = {}

        def capture(name: str):
            def hook(module, inputs, output):
                if name not in stats:  # first call of a module used twice
                    stats[name] = channel_moments(output.detach())

            return hook

        handles = [layer.module.register_forward_hook(capture(layer.name)) for layer in chosen]
        with hooks_removed(handles), torch.no_grad():
            Stateless(model)(x)
        rows = stats_records(chosen, stats, norm_mode(model, mode, x))
        return flagged(rows, all_finite([x, *stats.values()]), mode=mode)


def channel_moments(t: torch.Tensor) -> torch.Tensor:
    """(3, C): per-channel mean, population variance and squared mean of a (B, C, ...) tensor."""
    t = t.double()
    flat = t.transpose(0, 1).reshape(t.shape[1], -1)  # (C, B * positions)
    mean = flat.mean(dim=1)
    var = flat.var(dim=1, unbiased=False)
    return torch.stack([mean, var, (flat * flat).mean(dim=1)])


def stats_records(chosen, stats: dict[str, torch.Tensor], mode: str) -> list[dict]:
    records = []
    for layer in chosen:
        if layer.name not in stats:
            continue
        moments = stats[layer.name].tolist()
        for q, row in zip(QUANTITIES, moments, strict=True):
            records += [{"layer": layer.name, "depth": layer.depth, "channel": c,
                         "quantity": q, "value": v, "bn_mode": mode} for c, v in enumerate(row)]
    return records


@register_callback("activation_stats")
def activation_stats_callback(layers: Sequence[str | int] | None = None):
    """Log `activation_stats` on the current mini-batch (records tagged with the step)."""

    def callback(state: TrainState) -> None:
        rows = activation_stats(state.model, state.x, layers=layers)
        state.context.log_records("activation_stats", rows, step=state.step)

    return callback
