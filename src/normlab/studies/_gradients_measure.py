"""The measurements of the "gradients" task, called by `train` as a callback.

Every probe runs on the model as the trainer holds it (train mode: batch statistics) and leaves
it unchanged. Records are logged with `step` (updates applied) and `minibatch` (= step + 1, the
paper's numbering of the mini-batch whose gradient is taken).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normlab import probes
from normlab.probes._modules import select_layers
from normlab.train.callbacks import TrainState
from normlab.train.divergence import json_safe

MEASUREMENT_SEED = 12345  # the measurement batch is the same for every norm and every step


class Measurement:
    """Callback: step_loss at `step_loss_at`; the full set of probes at `measure_at`."""

    def __init__(self, options: dict[str, Any], context) -> None:
        self.options = options
        self.context = context
        self.batches: tuple | None = None

    def __call__(self, state: TrainState) -> None:
        wanted_loss = state.step in self.options["step_loss_at"]
        wanted_all = state.step in self.options["measure_at"]
        if not (wanted_loss or wanted_all):
            return
        if self.batches is None:
            self.batches = self._batches(state)
        (x, y), held_out = self.batches
        tag = {"step": state.step, "minibatch": state.step + 1}
        if wanted_loss:
            self.log("step_loss", probes.step_loss(state.model, state.loss_fn, (x, y),
                                                   eval_batch=held_out), tag)
        if wanted_all:
            self.measure(state.model, state.loss_fn, x, y, tag)

    def _batches(self, state: TrainState):
        size = state.spec.batch_size
        train = measurement_batch(state.train_data, size, MEASUREMENT_SEED, state.device)
        test = measurement_batch(state.test_data, size, MEASUREMENT_SEED, state.device)
        return train, test

    def log(self, probe: str, rows: list[dict], tag: dict) -> None:
        self.context.log_records(probe, [json_safe(r) for r in rows], **tag)

    def measure(self, model: nn.Module, loss_fn, x, y, tag: dict) -> None:
        opts = self.options
        depth = max(layer.depth for layer in select_layers(model, None))
        layers = [d for d in opts["layers"] if d <= depth]
        stats_layers = sorted({*range(1, depth + 1, opts["stats_every"]), depth})
        self.log("gradient_histogram", probes.gradient_histogram(
            model, loss_fn, (x, y), layers=[min(opts["histogram_layer"], depth)]), tag)
        sites = signal_sites(model, stats_layers)
        rows = probes.activation_stats(model, x, layers=list(sites))
        for r in rows:
            r["depth"] = sites[r["layer"]]
        self.log("activation_stats", rows, tag)
        self.log("output_gradients", probes.output_gradients(
            model, loss_fn, (x[:opts["probe_batch"]], y[:opts["probe_batch"]])), tag)
        self.log("gradient_coherence", probes.gradient_coherence(model, loss_fn, (x, y),
                                                                 layers=layers), tag)
        self.spectra(model, loss_fn, x[:opts["probe_batch"]], y[:opts["probe_batch"]],
                     stats_layers, tag)
        self.anatomy(model, loss_fn, x, y, layers, tag)

    def spectra(self, model, loss_fn, x, y, layers: list[int], tag: dict) -> None:
        chosen = select_layers(model, layers)
        weights = [f"{layer.name}.weight" for layer in chosen]
        exact = probes.per_example_loss_grads(model, loss_fn, (x, y), params=weights)
        shares = probes.per_example_contributions(model, loss_fn, (x, y))
        shares = type(shares)({k: shares[k] for k in weights}, quantity=shares.quantity,
                              bn_mode=shares.bn_mode, layers=shares.layers,
                              method=shares.method)
        self.log("gradient_spectrum", probes.gradient_spectrum(exact), tag)
        self.log("gradient_spectrum", probes.gradient_spectrum(shares), tag)

    def anatomy(self, model, loss_fn, x, y, layers: list[int], tag: dict) -> None:
        """Along the gradient up to the first step size of the grid whose loss diverges (the
        paper's 'diverging step'), or the largest step of the grid if none does."""
        grid = probes.step_loss(model, loss_fn, (x, y))
        diverging = [r["step_size"] for r in grid if r["diverged"]]
        step = min(diverging) if diverging else max(r["step_size"] for r in grid)
        rows = probes.step_anatomy(model, loss_fn, (x, y), step=step, layers=layers,
                                   points=self.options["anatomy_points"])
        for r in rows:
            r["diverging_step"] = bool(diverging)
        self.log("step_anatomy", rows, tag)


def signal_sites(model: nn.Module, depths: list[int]) -> dict[str, int]:
    """Where signal propagation is measured (E6): the output of the block holding each weight
    layer of `depths` but the last (for a ResNet the residual stream after the block), name ->
    depth of the block's last weight layer. A layer directly under the model root stands for
    itself."""
    layers = [layer for layer in select_layers(model, None) if layer.main_path]
    layers = layers[:-1] if len(layers) > 1 else layers  # the logits are E7's, not a signal
    owner = {layer.name: layer.name.rsplit(".", 1)[0] if "." in layer.name else layer.name
             for layer in layers}
    last = {}
    for layer in layers:
        last[owner[layer.name]] = max(last.get(owner[layer.name], 0), layer.depth)
    chosen = {owner[layer.name] for layer in layers if layer.depth in depths}
    return {name: last[name] for name in last if name in chosen}


def measurement_batch(data, size: int, seed: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` examples of `data` drawn without replacement by a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=gen)[:size].to(data.x.device)
    return data.x[index].to(device), data.y[index].to(device)
