"""Batch Renormalization (Ioffe 2017) for linear (N, C) and conv (N, C, H, W) features.

In training mode the batch-normalized value is corrected towards what the running statistics
would give, by two per-channel factors that are treated as constants in the backward pass:

    sigma_B = sqrt(var_B + eps)                 var_B biased (divide by n), as BatchNorm normalizes
    sigma   = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/rmax, rmax)     stop-gradient
    d = clip((mu_B - running_mean) / sigma, -dmax, dmax)   stop-gradient
    y = ((x - mu_B) / sigma_B * r + d) * gamma + beta

Gradients flow through mu_B and sigma_B exactly as in BatchNorm (scaled by r). Running statistics
follow torch's BatchNorm convention: running = (1 - bn_momentum) * running + bn_momentum * batch,
with the *unbiased* batch variance (divide by n - 1) stored in running_var. Eval mode uses the
running statistics only, like BatchNorm. With rmax = 1 and dmax = 0 the layer is BatchNorm.

The relaxation of rmax and dmax is expressed as a fraction of training (not in steps, so that a
change of batch size does not silently change it): `renorm_warmup = (start, end)`; before `start`
the limits are rmax = 1, dmax = 0 (plain BatchNorm), after `end` they are the final values, and
in between they move linearly. The trainer tells every layer where training stands with
`set_training_fraction(model, fraction)` before each step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normlab.utils.config import ConfigError, check_interval


class BatchRenorm(nn.modules.batchnorm._BatchNorm):
    """Batch Renormalization: batch statistics corrected by clipped r, d (train mode); running
    statistics in eval mode. Cost: one BatchNorm plus one statistics pass (no gradient).

    A `torch.nn.modules.batchnorm._BatchNorm` subclass, so `momentum = 0` freezes the running
    statistics (as `probes._hygiene.frozen_norm_statistics` does) and `running_mean`,
    `running_var` and `num_batches_tracked` are saved in the state_dict.

    Note: train mode is batch-coupled like BatchNorm. When r and d are not clipped the forward
    value equals the running-statistics normalization, yet one example's gradient still flows
    through the batch mean and variance into the others; r and d themselves carry no gradient.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, bn_momentum: float = 0.1,
                 rmax: float = 3.0, dmax: float = 5.0,
                 renorm_warmup: Sequence[float] = (0.05, 0.5)) -> None:
        check_interval("eps", eps, 0.0)
        check_interval("bn_momentum", bn_momentum, 0.0, 1.0, low_open=False, high_open=False)
        check_interval("rmax", rmax, 1.0, low_open=False)
        check_interval("dmax", dmax, 0.0, low_open=False)
        warmup = _check_warmup(renorm_warmup)
        super().__init__(num_features, eps=eps, momentum=bn_momentum, affine=True,
                         track_running_stats=True)
        self.rmax = float(rmax)
        self.dmax = float(dmax)
        self.renorm_warmup = warmup
        self.training_fraction = 0.0
        # (rmax_now, dmax_now) as a tensor, so a compiled forward reads it without recompiling
        # when the schedule moves; not saved (the trainer sets the fraction every step).
        self._limits_set = self.current_limits()
        self.register_buffer("limits", torch.tensor(self._limits_set), persistent=False)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError("BatchRenorm expects (N, C, ...) input; "
                             f"got shape {tuple(input.shape)}")

    def set_training_fraction(self, fraction: float) -> None:
        """Record how far training has got (0 = start, 1 = end); sets the current rmax, dmax."""
        check_interval("training fraction", fraction, 0.0, 1.0, low_open=False, high_open=False)
        self.training_fraction = float(fraction)
        limits = self.current_limits()
        if limits != self._limits_set:  # write the buffer only when the limits move
            self.limits[0].fill_(limits[0])  # fill_: no host-device synchronization
            self.limits[1].fill_(limits[1])
            self._limits_set = limits

    def current_limits(self) -> tuple[float, float]:
        """(rmax_now, dmax_now) at the current training fraction (linear relaxation)."""
        start, end = self.renorm_warmup
        f = self.training_fraction
        if end > start:
            t = min(max((f - start) / (end - start), 0.0), 1.0)
        else:
            t = 1.0 if f >= start else 0.0
        return 1.0 + t * (self.rmax - 1.0), t * self.dmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        n = x.numel() // x.size(1)
        if n < 2:
            raise ValueError("BatchRenorm needs more than 1 value per channel when training; "
                             f"got input shape {tuple(x.shape)}")
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):  # statistics in float32, as cuDNN BN does
            x = x.float()
        with torch.no_grad():  # r and d are constants for the backward pass
            var, mean = torch.var_mean(x, [0, *range(2, x.dim())], unbiased=False)  # (C,)
            rmax, dmax = self.limits.to(x.dtype)
            running_std = torch.sqrt(self.running_var + self.eps)
            r = torch.clamp(torch.sqrt(var + self.eps) / running_std, 1.0 / rmax, rmax)
            d = torch.clamp((mean - self.running_mean) / running_std, -dmax, dmax)
            self.num_batches_tracked.add_(1)  # update after r, d used the old statistics
            m = self.momentum
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
            unbiased = var * (n / (n - 1))  # running_var stores the unbiased estimate, as torch BN
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        # ((x - mu_B) / sigma_B * r + d) * gamma + beta is BatchNorm with batch statistics and
        # the affine (gamma * r, beta + gamma * d): torch's fused kernel, gradients through
        # mu_B and sigma_B (biased variance, as torch BN) and through gamma and beta.
        y = F.batch_norm(x, None, None, self.weight * r, self.bias + self.weight * d,
                         True, 0.0, self.eps)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, "
                f"renorm_warmup={self.renorm_warmup}")


def _check_warmup(renorm_warmup: Sequence[float]) -> tuple[float, float]:
    ok = (isinstance(renorm_warmup, Sequence) and len(renorm_warmup) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in renorm_warmup))
    if ok:
        start, end = (float(v) for v in renorm_warmup)
        ok = 0.0 <= start <= end <= 1.0
    if not ok:
        raise ConfigError("The 'renorm_warmup' setting must be a pair (start, end) of fractions of "
                          f"training with 0 <= start <= end <= 1; got {renorm_warmup!r}.")
    return start, end


def set_training_fraction(model: nn.Module, fraction: float) -> None:
    """Tell every layer of `model` that has a training-fraction schedule (BatchRenorm) where
    training stands: 0 at the first step, 1 at the end. The trainer calls this every step.
    """
    for module in model.modules():
        setter = getattr(module, "set_training_fraction", None)
        if callable(setter):
            setter(fraction)
