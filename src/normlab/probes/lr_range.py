"""Leslie Smith's learning-rate range test: train briefly while the lr ramps up, watch the loss.

A copy of the model's trainable parameters (and of its buffers: running statistics are updated
on the copy as in training) trains on a ramp of learning rates, run functionally: the model,
its parameters and the user's optimizer are never written, so the test is a probe.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from normlab.probes._batches import Batch, LossFn
from normlab.probes._calling import batch_loss, check_batch, convention, is_batch
from normlab.probes._hygiene import preserved
from normlab.probes._modes import MODES, norm_mode, probe_mode
from normlab.probes._modules import select_params
from normlab.probes._results import RecordsMixin
from normlab.probes._stateless import Stateless
from normlab.utils.config import ConfigError, check_choice, check_interval

RAMPS = ("exp", "linear")


@dataclass
class LRRangeResult(RecordsMixin):
    """The loss curve of a range test and the learning rates read off it.

    `smoothed` is the bias-corrected exponential moving average of `losses`.
    `lr_at_min`: the lr where the smoothed loss is lowest (where learning stops improving; on a
    quadratic this sits at the stability edge 2/lambda_max). `lr_steepest`: where the loss falls
    fastest per unit of log lr, read from local least-squares lines through the raw losses
    over windows of a tenth of the ramp (at least 5 points), up to the minimum: neither the
    noise of single mini-batches at the start nor the lag of the moving average moves it.
    `suggested_lr` = `lr_steepest` (Smith's choice of a point on the steep part of the curve);
    `lr_at_min / 10` is fastai's alternative.
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


def lr_schedule(start: float, end: float, steps: int, ramp: str = "exp") -> list[float]:
    """`steps` learning rates from `start` to `end`, geometric ("exp") or arithmetic."""
    if ramp == "exp":
        return [float(v) for v in np.geomspace(start, end, steps)]
    return [float(v) for v in np.linspace(start, end, steps)]


@convention()
def lr_range_test(model: nn.Module, loss_fn: LossFn, data: Iterable[Batch], *,
                  start: float = 1e-5, end: float = 10.0, steps: int = 100, ramp: str = "exp",
                  smoothing: float = 0.98, diverge_factor: float = 4.0, momentum: float = 0.0,
                  weight_decay: float = 0.0, optimizer: torch.optim.Optimizer | None = None,
                  mode: str = "keep") -> LRRangeResult:
    """Loss of a short training run whose lr ramps from `start` to `end` over `steps` steps, in
    `mode` ("keep": the model's own modes, as in its training; "train"; "eval"); stops once the
    smoothed loss exceeds `diverge_factor` x its minimum or is not finite. Costs up to `steps`
    forward+backward passes. The model, its parameters and `optimizer` are left untouched.

    `data`: an iterable of (x, y) batches (a loader; cycled if it runs out) or one batch.
    `optimizer`: the user's optimizer, whose class, hyperparameters and state are copied onto
    the trained copy (only the lr is ramped); default plain SGD with `momentum` and
    `weight_decay`. `smoothing` is the EMA factor (0: no smoothing). `ramp` is "exp"
    (geometric) or "linear"; the old name `mode` for it works for one release.
    Notes: the curve depends on the ramp rate (steps); with momentum the stability edge of
    a quadratic moves from 2/lambda to 2(1+momentum)/lambda.
    """
    if mode in RAMPS:
        warnings.warn("lr_range_test(mode='exp'/'linear') is deprecated; the ramp is now "
                      "'ramp', and 'mode' is the probe mode.", DeprecationWarning, stacklevel=2)
        ramp, mode = mode, "keep"
    check_interval("start", start, 0.0)
    check_interval("end", end, start)
    check_interval("steps", steps, 3, math.inf, kind=int, low_open=False)
    check_choice("ramp", ramp, RAMPS)
    check_choice("mode", mode, MODES)
    check_interval("smoothing", smoothing, 0.0, 1.0, low_open=False)
    check_interval("diverge_factor", diverge_factor, 1.0)
    check_interval("momentum", momentum, 0.0, 1.0, low_open=False)
    check_interval("weight_decay", weight_decay, 0.0, low_open=False)
    if is_batch(data):
        data = [data]
    schedule = lr_schedule(start, end, steps, ramp)
    lrs, losses, smoothed = [], [], []
    batches = _forever(data)
    first = next(batches)
    with preserved(model), probe_mode(model, mode, first[0]):
        measured = norm_mode(model, mode, first[0])
        forward = Stateless(model, carry_buffers=True)
        params = {n: p.detach().clone().requires_grad_(True)
                  for n, p in select_params(model, None).items()}
        trainer = _copied_optimizer(model, optimizer, params, momentum, weight_decay)
        average, best = 0.0, math.inf
        for i, (lr, (x, y)) in enumerate(zip(schedule, itertools.chain([first], batches),
                                                      strict=False)):
            for group in trainer.param_groups:
                group["lr"] = lr
            loss = batch_loss(loss_fn, forward(x, params), y)
            value = float(loss.detach())
            average = smoothing * average + (1 - smoothing) * value
            current = average / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(current)
            if not math.isfinite(current) or current > diverge_factor * best:
                break
            best = min(best, current)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for p, g in zip(params.values(), grads, strict=True):
                p.grad = g
            trainer.step()
    return _read_curve(lrs, losses, smoothed, best, diverge_factor, measured)


def _copied_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                      params: dict[str, torch.Tensor], momentum: float, weight_decay: float
                      ) -> torch.optim.Optimizer:
    """An optimizer over `params` (copies of the model's parameters): the user's optimizer's
    class, groups and state (deep-copied), or SGD with `momentum` and `weight_decay`."""
    if optimizer is None:
        return torch.optim.SGD(list(params.values()), lr=0.0, momentum=momentum,
                               weight_decay=weight_decay)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"The 'optimizer' setting must be a torch.optim.Optimizer over the "
                          f"model's parameters; got {type(optimizer).__name__}.")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        unknown = [p for p in group["params"] if names.get(id(p)) not in params]
        if unknown:
            raise ConfigError("The 'optimizer' setting must hold only the model's trainable "
                              f"parameters; it holds {len(unknown)} other tensor(s).")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [params[names[id(p)]] for p in group["params"]]})
    copied = type(optimizer)(groups, **optimizer.defaults)
    copied.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return copied


def _forever(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The loader's batches, iterated again whenever it runs out (nothing is cached, so a
    shuffling loader reshuffles and memory stays at one batch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            if not is_batch(batch):
                raise ConfigError("The 'data' setting of lr_range_test must yield (x, y) "
                                  f"batches; got an item of type {type(batch).__name__}.")
            yield check_batch((batch[0], batch[1]), "lr_range_test")
        if empty:
            raise ConfigError("The 'data' setting of lr_range_test must yield at least one "
                              "(x, y) batch; got none.")


def _read_curve(lrs: list[float], losses: list[float], smoothed: list[float], best: float,
                diverge_factor: float, mode: str) -> LRRangeResult:
    finite = [i for i, s in enumerate(smoothed) if math.isfinite(s)]
    at_min = min(finite, key=lambda i: smoothed[i])
    last = smoothed[-1]
    diverged = lrs[-1] if not math.isfinite(last) or last > diverge_factor * best else None
    steepest = _steepest(lrs, losses, [i for i in finite if i <= at_min] or [at_min])
    return LRRangeResult(lrs, losses, smoothed, lrs[at_min], lrs[steepest], lrs[steepest],
                         diverged, mode)


def _steepest(lrs: list[float], losses: list[float], upto: list[int]) -> int:
    """The index where the raw loss falls fastest per unit of log lr: the most negative slope of
    least-squares lines over centred windows of max(5, n // 10) points (clipped at the ends)."""
    if len(upto) < 3:
        return upto[0]
    log_lr = np.log(np.array([lrs[i] for i in upto]))
    loss = np.array([losses[i] for i in upto])
    half = max(2, len(upto) // 20)
    slopes = []
    for j in range(len(upto)):
        lo, hi = max(0, j - half), min(len(upto), j + half + 1)
        slopes.append(np.polyfit(log_lr[lo:hi], loss[lo:hi], 1)[0] if hi - lo >= 3 else np.inf)
    return upto[int(np.argmin(slopes))]
