"""The loss along the gradient (E4) and the anatomy of a diverging step (E5).

The paper takes the mini-batch gradient g at a point theta and evaluates L(theta - s g) / L(theta)
for step sizes s on a log grid: with BN the ratio stays within a factor of a few, without BN it
explodes past 1e6 a little beyond s ~ 1e-3. Divergence is a loss > 1e3 (or non-finite).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from normlab.config import ConfigError, check_choice, check_interval
from normlab.probes._hygiene import frozen_norm_statistics, preserved
from normlab.probes._modules import hooks_removed, select_layers
from normlab.probes.activations import QUANTITIES, channel_moments
from normlab.train.callbacks import TrainState, register_callback

BN_MODES = ("train", "eval")
DIVERGENCE_THRESHOLD = 1e3

Batch = tuple[torch.Tensor, torch.Tensor]


def default_steps() -> torch.Tensor:
    """The paper's grid: 41 step sizes from 1e-5 to 1e-1, log-spaced."""
    return torch.logspace(-5, -1, 41, dtype=torch.float64)


def step_loss(model: nn.Module, loss_fn, batch: Batch,
              direction: Mapping[str, torch.Tensor] | None = None,
              steps: Sequence[float] | torch.Tensor | None = None,
              eval_batch: Batch | None = None, bn_mode: str = "train",
              threshold: float = DIVERGENCE_THRESHOLD) -> list[dict]:
    """Relative loss L(theta - s d) / L(theta) for each step size s, with BN in `bn_mode`
    ("train": batch statistics, running statistics not updated; "eval": running statistics);
    cost: one backward (for the default direction) plus one forward per step size and batch.

    `direction` (parameter name -> tensor) defaults to the gradient of `loss_fn` on `batch` at
    theta (the mini-batch gradient, mean-reduced if the loss is); parameters not in it do not
    move. The loss is measured on `batch` ("same") and, if given, on `eval_batch` ("held_out").
    `steps` defaults to logspace(-5, -1, 41). Records: step_size, quantity "relative_loss",
    value, loss, start_loss, batch, diverged (loss > threshold or non-finite), threshold,
    direction ("batch_gradient" or "given"), direction_norm, bn_mode. Parameters are restored.
    """
    check_choice("bn_mode", bn_mode, BN_MODES)
    check_interval("threshold", threshold, 0)
    grid = _check_steps(steps)
    with preserved(model), frozen_norm_statistics(model):
        model.train(bn_mode == "train")
        moved, label = _direction(model, loss_fn, batch, direction)
        norm = math.sqrt(sum((d.double() ** 2).sum().item() for _, _, d in moved.values()))
        batches = [("same", batch)] + ([("held_out", eval_batch)] if eval_batch is not None
                                       else [])
        records = []
        with torch.no_grad():
            start = {tag: _loss(model, loss_fn, b) for tag, b in batches}
            for s in grid.tolist():
                _move(moved, s)
                for tag, b in batches:
                    loss = _loss(model, loss_fn, b)
                    records.append({
                        "step_size": s, "quantity": "relative_loss",
                        "value": loss / start[tag] if start[tag] != 0 else math.nan,
                        "loss": loss, "start_loss": start[tag], "batch": tag,
                        "diverged": not math.isfinite(loss) or loss > threshold,
                        "threshold": threshold, "direction": label,
                        "direction_norm": norm, "bn_mode": bn_mode})
        return records


def step_anatomy(model: nn.Module, loss_fn, batch: Batch, step: float,
                 layers: Sequence[str | int], points: int = 50,
                 direction: Mapping[str, torch.Tensor] | None = None,
                 bn_mode: str = "train") -> list[dict]:
    """Per-channel activation mean and variance at `layers` at `points` evenly spaced points on
    the line from theta to theta - step * d (d: the mini-batch gradient by default), with BN in
    `bn_mode`; cost: one backward plus `points` forward passes.

    Records: layer, depth, channel, fraction (0 ... 1 of the step), step_size, quantity
    ("mean", "variance", "squared_mean"), value, bn_mode; and one "loss" record per point
    (layer None). Parameters are restored and running statistics not updated.
    """
    check_choice("bn_mode", bn_mode, BN_MODES)
    check_interval("step", step, 0)
    check_interval("points", points, 2, kind=int, low_open=False)
    _x, _ = batch
    with preserved(model), frozen_norm_statistics(model):
        model.train(bn_mode == "train")
        chosen = select_layers(model, layers)
        moved, _ = _direction(model, loss_fn, batch, direction)
        stats: dict[str, torch.Tensor] = {}

        def capture(name: str):
            def hook(module, inputs, output):
                stats.setdefault(name, channel_moments(output.detach()))

            return hook

        records = []
        handles = [layer.module.register_forward_hook(capture(layer.name)) for layer in chosen]
        with hooks_removed(handles), torch.no_grad():
            for fraction in torch.linspace(0, 1, points, dtype=torch.float64).tolist():
                _move(moved, fraction * step)
                stats.clear()
                loss = _loss(model, loss_fn, batch)
                base = {"fraction": fraction, "step_size": step, "bn_mode": bn_mode}
                records.append({**base, "layer": None, "depth": None, "quantity": "loss",
                                "value": loss})
                for layer in chosen:
                    for q, row in zip(QUANTITIES, stats[layer.name].tolist(), strict=True):
                        records += [{**base, "layer": layer.name, "depth": layer.depth,
                                     "channel": c, "quantity": q, "value": v}
                                    for c, v in enumerate(row)]
        return records


def _check_steps(steps) -> torch.Tensor:
    grid = default_steps() if steps is None else torch.as_tensor(steps, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() == 0 or not bool(torch.isfinite(grid).all()) \
            or bool((grid < 0).any()):
        raise ConfigError(f"The 'steps' setting must be a non-empty 1-D sequence of finite step "
                          f"sizes >= 0; got {steps!r}.")
    return grid


def _direction(model, loss_fn, batch, direction):
    """{name: (parameter, its value at theta, direction)} and the direction's label."""
    named = dict(model.named_parameters())
    if direction is None:
        x, y = batch
        params = {k: p for k, p in named.items() if p.requires_grad}
        grads = torch.autograd.grad(loss_fn(model(x), y), list(params.values()),
                                    allow_unused=True)
        direction = {k: g for k, g in zip(params, grads, strict=True) if g is not None}
        label = "batch_gradient"
    else:
        unknown = [k for k in direction if k not in named]
        if unknown:
            raise ConfigError.choice("direction", unknown[0], list(named))
        label = "given"
    moved = {k: (named[k], named[k].detach().clone(), d.detach().to(named[k].dtype))
             for k, d in direction.items()}
    return moved, label


def _move(moved, s: float) -> None:
    with torch.no_grad():
        for p, start, d in moved.values():
            p.copy_(start - s * d)


def _loss(model, loss_fn, batch) -> float:
    x, y = batch
    return float(loss_fn(model(x), y))


@register_callback("step_loss")
def step_loss_callback(steps: Sequence[float] | None = None, bn_mode: str = "train"):
    """Log `step_loss` along the current mini-batch gradient (records tagged with the step)."""
    check_choice("bn_mode", bn_mode, BN_MODES)
    grid = _check_steps(steps)

    def callback(state: TrainState) -> None:
        rows = step_loss(state.model, state.loss_fn, (state.x, state.y), steps=grid,
                         bn_mode=bn_mode)
        state.context.log_records("step_loss", rows, step=state.step)

    return callback
