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

from normlab.probes._batches import Batch
from normlab.probes._calling import batch_loss, convention, one_batch
from normlab.probes._hygiene import preserved
from normlab.probes._modes import MODES, norm_mode, probe_mode, resolve_mode
from normlab.probes._modules import hooks_removed, select_layers, select_params
from normlab.probes._results import Records, flagged
from normlab.probes._stateless import Stateless, leaves
from normlab.probes.activations import QUANTITIES, channel_moments
from normlab.train.callbacks import TrainState, register_callback
from normlab.utils.config import ConfigError, check_choice, check_interval

DIVERGENCE_THRESHOLD = 1e3


def default_steps() -> torch.Tensor:
    """The paper's grid: 41 step sizes from 1e-5 to 1e-1, log-spaced."""
    return torch.logspace(-5, -1, 41, dtype=torch.float64)


@convention(old_positional=("direction", "steps", "eval_batch", "bn_mode", "threshold"))
def step_loss(model: nn.Module, loss_fn, data: Batch, *,
              direction: Mapping[str, torch.Tensor] | None = None,
              steps: Sequence[float] | torch.Tensor | None = None,
              eval_batch: Batch | None = None, mode: str | None = None,
              threshold: float = DIVERGENCE_THRESHOLD, bn_mode: str | None = None) -> Records:
    """Relative loss L(theta - s d) / L(theta) for each step size s on one batch `data` = (x, y),
    in `mode` (default "train": normalization layers on batch statistics, Dropout off; "eval";
    "keep"); cost: one backward (for the default direction) plus one forward per step size and
    batch. The moved weights are evaluated functionally; nothing of the model is written.

    `direction` (parameter name -> tensor) defaults to the gradient of `loss_fn` on `batch` at
    theta (the mini-batch gradient, mean-reduced if the loss is); parameters not in it do not
    move. The loss is measured on `batch` ("same") and, if given, on `eval_batch` ("held_out").
    `steps` defaults to logspace(-5, -1, 41). Records: step_size, quantity "relative_loss",
    value, loss, start_loss, batch, diverged (loss > threshold or non-finite), threshold,
    direction ("batch_gradient" or "given"), direction_norm, bn_mode, mode; `finite=False`
    where the start loss or the direction is not finite.
    """
    check_interval("threshold", threshold, 0)
    mode = resolve_mode(mode, bn_mode, "train")
    batch = one_batch(data, "step_loss")
    grid = _check_steps(steps)
    with preserved(model), probe_mode(model, mode, batch[0]):
        measured = norm_mode(model, mode, batch[0])
        forward = Stateless(model)
        moved, label = _direction(model, forward, loss_fn, batch, direction)
        norm = math.sqrt(sum((d.double() ** 2).sum().item() for _, d in moved.values()))
        batches = [("same", batch)] + ([("held_out", one_batch(eval_batch, "step_loss"))]
                                       if eval_batch is not None else [])
        records = []
        with torch.no_grad():
            start = {tag: _loss(forward, loss_fn, b, _moved(moved, 0.0)) for tag, b in batches}
            for s in grid.tolist():
                params = _moved(moved, s)
                for tag, b in batches:
                    loss = _loss(forward, loss_fn, b, params)
                    records.append({
                        "step_size": s, "quantity": "relative_loss",
                        "value": loss / start[tag] if start[tag] != 0 else math.nan,
                        "loss": loss, "start_loss": start[tag], "batch": tag,
                        "diverged": not math.isfinite(loss) or loss > threshold,
                        "threshold": threshold, "direction": label,
                        "direction_norm": norm, "bn_mode": measured, "mode": mode})
        finite = math.isfinite(norm) and all(math.isfinite(v) for v in start.values())
        return flagged(records, finite)


@convention(old_positional=("step", "layers", "points", "direction", "bn_mode"))
def step_anatomy(model: nn.Module, loss_fn, data: Batch, *, step: float,
                 layers: Sequence[str | int], points: int = 50,
                 direction: Mapping[str, torch.Tensor] | None = None,
                 mode: str | None = None, bn_mode: str | None = None) -> Records:
    """Per-channel activation mean and variance at `layers` at `points` evenly spaced points on
    the line from theta to theta - step * d (d: the mini-batch gradient by default) on one
    batch `data` = (x, y), in `mode` (default "train"); cost: one backward plus `points`
    forward passes.

    Records: layer, depth, channel, fraction (0 ... 1 of the step), step_size, quantity
    ("mean", "variance", "squared_mean"), value, bn_mode; and one "loss" record per point
    (layer None). Parameters and running statistics are never written.
    """
    check_interval("step", step, 0)
    check_interval("points", points, 2, kind=int, low_open=False)
    mode = resolve_mode(mode, bn_mode, "train")
    batch = one_batch(data, "step_anatomy")
    with preserved(model), probe_mode(model, mode, batch[0]):
        measured = norm_mode(model, mode, batch[0])
        forward = Stateless(model)
        chosen = select_layers(model, layers)
        moved, _ = _direction(model, forward, loss_fn, batch, direction)
        stats: dict[str, torch.Tensor] = {}

        def capture(name: str):
            def hook(module, inputs, output):
                stats.setdefault(name, channel_moments(output.detach()))

            return hook

        records = []
        handles = [layer.module.register_forward_hook(capture(layer.name)) for layer in chosen]
        with hooks_removed(handles), torch.no_grad():
            for fraction in torch.linspace(0, 1, points, dtype=torch.float64).tolist():
                stats.clear()
                loss = _loss(forward, loss_fn, batch, _moved(moved, fraction * step))
                base = {"fraction": fraction, "step_size": step, "bn_mode": measured,
                        "mode": mode}
                records.append({**base, "layer": None, "depth": None, "quantity": "loss",
                                "value": loss})
                for layer in chosen:
                    for q, row in zip(QUANTITIES, stats[layer.name].tolist(), strict=True):
                        records += [{**base, "layer": layer.name, "depth": layer.depth,
                                     "channel": c, "quantity": q, "value": v}
                                    for c, v in enumerate(row)]
        return Records(records)


def _check_steps(steps) -> torch.Tensor:
    grid = default_steps() if steps is None else torch.as_tensor(steps, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() == 0 or not bool(torch.isfinite(grid).all()) \
            or bool((grid < 0).any()):
        raise ConfigError(f"The 'steps' setting must be a non-empty 1-D sequence of finite step "
                          f"sizes >= 0; got {steps!r}.")
    return grid


def _direction(model, forward, loss_fn, batch, direction):
    """{name: (value at theta, direction)} and the direction's label."""
    named = dict(model.named_parameters())
    if direction is None:
        x, y = batch
        params = leaves(select_params(model, None))
        grads = torch.autograd.grad(batch_loss(loss_fn, forward(x, params), y),
                                    list(params.values()), allow_unused=True)
        direction = {k: g for k, g in zip(params, grads, strict=True) if g is not None}
        label = "batch_gradient"
    else:
        unknown = [k for k in direction if k not in named]
        if unknown:
            raise ConfigError.choice("direction", unknown[0], list(named))
        label = "given"
    moved = {k: (named[k].detach(), d.detach().to(named[k].dtype))
             for k, d in direction.items()}
    return moved, label


def _moved(moved, s: float) -> dict[str, torch.Tensor]:
    """The parameters at theta - s d (only those the direction moves)."""
    return {k: start - s * d for k, (start, d) in moved.items()}


def _loss(forward, loss_fn, batch, params) -> float:
    x, y = batch
    return float(batch_loss(loss_fn, forward(x, params), y))


@register_callback("step_loss")
def step_loss_callback(steps: Sequence[float] | None = None, bn_mode: str = "train"):
    """Log `step_loss` along the current mini-batch gradient (records tagged with the step);
    `bn_mode` is the probe mode ("train", "eval" or "keep")."""
    check_choice("bn_mode", bn_mode, MODES)
    grid = _check_steps(steps)

    def callback(state: TrainState) -> None:
        rows = step_loss(state.model, state.loss_fn, (state.x, state.y), steps=grid,
                         mode=bn_mode)
        state.context.log_records("step_loss", rows, step=state.step)

    return callback
