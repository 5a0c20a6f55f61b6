"""Leslie Smith's learning-rate range test: train briefly while the lr ramps up, watch the loss.

The model trains with SGD (train-mode BN, running statistics updated as in training) on a
ramp of learning rates; everything is restored afterwards (`preserved`), so the test is a probe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.config import ConfigError, check_choice, check_interval
from normlab.probes._batches import Batch, LossFn
from normlab.probes._hygiene import bn_mode, preserved

MODES = ("exp", "linear")


@dataclass
class LRRangeResult:
    """The loss curve of a range test and the learning rates read off it.

    `smoothed` is the bias-corrected exponential moving average of `losses`.
    `lr_at_min`: the lr where the smoothed loss is lowest (where learning stops improving; on a
    quadratic this sits at the stability edge 2/lambda_max). `lr_steepest`: where the smoothed
    loss falls fastest per unit of log lr. `suggested_lr` = `lr_steepest` (Smith's choice of a
    point on the steep part of the curve); `lr_at_min / 10` is fastai's alternative.
    `diverged_lr` is the lr at which the smoothed loss exceeded diverge_factor x its minimum
    (None if it never did).
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    lr_at_min: float
    lr_steepest: float
    suggested_lr: float
    diverged_lr: float | None
    bn_mode: str

    def records(self) -> list[dict[str, Any]]:
        rows = [{"step": i, "lr": lr, "quantity": "loss", "value": loss, "smoothed": s,
                 "bn_mode": self.bn_mode}
                for i, (lr, loss, s) in enumerate(zip(self.lrs, self.losses, self.smoothed,
                                                      strict=True))]
        for quantity in ("lr_at_min", "lr_steepest", "suggested_lr", "diverged_lr"):
            rows.append({"quantity": quantity, "value": getattr(self, quantity),
                         "bn_mode": self.bn_mode})
        return rows


def lr_schedule(start: float, end: float, steps: int, mode: str = "exp") -> list[float]:
    """`steps` learning rates from `start` to `end`, geometric ("exp") or arithmetic."""
    if mode == "exp":
        return [float(v) for v in np.geomspace(start, end, steps)]
    return [float(v) for v in np.linspace(start, end, steps)]


def lr_range_test(model: nn.Module, loss_fn: LossFn, loader: Iterable[Batch], start: float = 1e-5,
                  end: float = 10.0, steps: int = 100, mode: str = "exp",
                  smoothing: float = 0.98, diverge_factor: float = 4.0, momentum: float = 0.0,
                  weight_decay: float = 0.0) -> LRRangeResult:
    """Loss of a short SGD run whose lr ramps from `start` to `end` over `steps` steps, in the
    model's current BN mode; stops once the smoothed loss exceeds `diverge_factor` x its minimum
    or is not finite. Costs up to `steps` forward+backward passes; the model is restored.

    `loader` is cycled if it runs out. `smoothing` is the EMA factor (0: no smoothing).
    Notes: the curve depends on the ramp rate (steps); with momentum the stability edge of
    a quadratic moves from 2/lambda to 2(1+momentum)/lambda.
    """
    check_interval("start", start, 0.0)
    check_interval("end", end, start)
    check_interval("steps", steps, 3, math.inf, kind=int, low_open=False)
    check_choice("mode", mode, MODES)
    check_interval("smoothing", smoothing, 0.0, 1.0, low_open=False)
    check_interval("diverge_factor", diverge_factor, 1.0)
    check_interval("momentum", momentum, 0.0, 1.0, low_open=False)
    check_interval("weight_decay", weight_decay, 0.0, low_open=False)
    schedule = lr_schedule(start, end, steps, mode)
    mode_name = bn_mode(model)
    lrs, losses, smoothed = [], [], []
    with preserved(model):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=start, momentum=momentum,
                                    weight_decay=weight_decay)
        average, best = 0.0, math.inf
        for i, (lr, (x, y)) in enumerate(zip(schedule, _forever(loader), strict=False)):
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            value = float(loss.detach())
            average = smoothing * average + (1 - smoothing) * value
            current = average / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(current)
            if not math.isfinite(current) or current > diverge_factor * best:
                break
            best = min(best, current)
            loss.backward()
            optimizer.step()
    return _read_curve(lrs, losses, smoothed, best, diverge_factor, mode_name)


def _forever(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The loader's batches, iterated again whenever it runs out (nothing is cached, so a
    shuffling loader reshuffles and memory stays at one batch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("The 'loader' setting must yield at least one (x, y) batch; "
                              "got none.")


def _read_curve(lrs: list[float], losses: list[float], smoothed: list[float], best: float,
                diverge_factor: float, mode: str) -> LRRangeResult:
    finite = [i for i, s in enumerate(smoothed) if math.isfinite(s)]
    at_min = min(finite, key=lambda i: smoothed[i])
    last = smoothed[-1]
    diverged = lrs[-1] if not math.isfinite(last) or last > diverge_factor * best else None
    # steepest descent per unit of log lr, over the finite part up to the minimum
    upto = [i for i in finite if i <= at_min] or [at_min]
    if len(upto) >= 2:
        s = np.array([smoothed[i] for i in upto])
        log_lr = np.log(np.array([lrs[i] for i in upto]))
        slopes = np.gradient(s, log_lr)
        steepest = upto[int(np.argmin(slopes))]
    else:
        steepest = at_min
    return LRRangeResult(lrs, losses, smoothed, lrs[at_min], lrs[steepest], lrs[steepest],
                         diverged, mode)
