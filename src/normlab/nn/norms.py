"""Normalization layers by name: `make_norm(kind, channels, **options)`.

Conventions (one signature for every kind; the channels always come first):

- "none": `nn.Identity`.
- "batch": BatchNorm over the batch and spatial positions, per channel; accepts (N, C) and
  (N, C, H, W) input (`BatchNorm` is a `torch.nn.BatchNorm2d` that also takes (N, C)).
- "group": GroupNorm with min(32, C) groups, or `groups=`; the groups must divide C.
- "layer": per example over all of (C, H, W) (GroupNorm with one group), affine per channel.
- "instance": per example and channel over (H, W), affine per channel, no running statistics.
- "batch_renorm": Batch Renormalization (Ioffe 2017), see `normlab.nn.batch_renorm`.

Options: `eps` (all but "none"), `bn_momentum` ("batch", "batch_renorm"; torch's convention:
running = (1 - bn_momentum) * running + bn_momentum * batch), `groups` ("group"), and `rmax`,
`dmax`, `renorm_warmup` ("batch_renorm"). An option a kind does not take is refused.
New kinds are added with `@register_norm("name")` on a factory `fn(channels, **options)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from normlab.nn.batch_renorm import BatchRenorm
from normlab.utils.config import ConfigError, check_interval
from normlab.utils.registry import Registry

NormFactory = Callable[..., nn.Module]
_NORMS: Registry[NormFactory] = Registry("norm")


def register_norm(name: str, *, overwrite: bool = False) -> Callable[[NormFactory], NormFactory]:
    """Register a factory `fn(channels, **options) -> nn.Module` under `name`.

    The factory's keyword parameters are the options it accepts; `make_norm` refuses others.
    """
    return _NORMS.register(name, overwrite=overwrite)


def list_norms() -> list[str]:
    """The registered normalization kinds, in registration order."""
    return _NORMS.names()


def make_norm(kind: str | NormFactory, channels: int, **options: Any) -> nn.Module:
    """A normalization layer of `kind` for `channels` features (conv channels or linear units).

    `kind` is a registered name or a callable `fn(channels, **options)`. Raises ConfigError for
    an unknown kind, an option the kind does not take, or a bad option value.
    """
    factory = kind if callable(kind) else _NORMS.get(kind)
    check_interval("channels", channels, 1, kind=int, low_open=False)
    accepted = _keyword_options(factory)
    if accepted is not None:
        unknown = [key for key in options if key not in accepted]
        if unknown:
            allowed = (f"may only hold {', '.join(repr(a) for a in accepted)}" if accepted
                       else "must be empty")
            raise ConfigError(f"The 'norm_options' setting for norm {kind!r} {allowed}; "
                              f"got {', '.join(repr(u) for u in unknown)}.")
    return factory(channels, **options)


def _keyword_options(factory: NormFactory) -> list[str] | None:
    """Names of the options a factory takes, or None when it takes **kwargs."""
    params = list(inspect.signature(factory).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm per channel over the batch (and positions); takes (N, C) or (N, C, H, W)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"BatchNorm expects (N, C) or (N, C, H, W) input; "
                             f"got shape {tuple(input.shape)}")


class LayerNormChannels(nn.GroupNorm):
    """LayerNorm for conv features: per example over (C, H, W), affine per channel.

    On (N, C) input it is the usual LayerNorm over the features.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(1, channels, eps=eps, affine=True)


class InstanceNorm(nn.GroupNorm):
    """InstanceNorm: per example and channel over (H, W), affine, no running statistics.

    Needs spatial positions: (N, C) input is refused (a single value has no variance).
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"InstanceNorm needs (N, C, H, W) input; got shape {tuple(x.shape)}")
        return super().forward(x)


def _check_eps(eps: float) -> float:
    check_interval("eps", eps, 0.0)
    return float(eps)


def _check_momentum(bn_momentum: float) -> float:
    check_interval("bn_momentum", bn_momentum, 0.0, 1.0, low_open=False, high_open=False)
    return float(bn_momentum)


@register_norm("none")
def _none(channels: int) -> nn.Module:
    return nn.Identity()


@register_norm("batch")
def _batch(channels: int, *, eps: float = 1e-5, bn_momentum: float = 0.1) -> nn.Module:
    return BatchNorm(channels, eps=_check_eps(eps), momentum=_check_momentum(bn_momentum))


@register_norm("group")
def _group(channels: int, *, eps: float = 1e-5, groups: int | None = None) -> nn.Module:
    if groups is None:
        groups = min(32, channels)
        if channels % groups:
            raise ConfigError(f"The 'groups' setting defaults to min(32, channels) = {groups}, "
                              f"which does not divide {channels} channels; pass groups= "
                              "a divisor of the channels.")
    check_interval("groups", groups, 1, kind=int, low_open=False)
    if channels % groups:
        divisors = [g for g in range(1, channels + 1) if channels % g == 0]
        raise ConfigError(f"The 'groups' setting must divide the {channels} channels "
                          f"(one of {divisors}); got {groups!r}.")
    return nn.GroupNorm(groups, channels, eps=_check_eps(eps), affine=True)


@register_norm("layer")
def _layer(channels: int, *, eps: float = 1e-5) -> nn.Module:
    return LayerNormChannels(channels, eps=_check_eps(eps))


@register_norm("instance")
def _instance(channels: int, *, eps: float = 1e-5) -> nn.Module:
    return InstanceNorm(channels, eps=_check_eps(eps))


@register_norm("batch_renorm")
def _batch_renorm(channels: int, *, eps: float = 1e-5, bn_momentum: float = 0.1,
                  rmax: float = 3.0, dmax: float = 5.0,
                  renorm_warmup: Sequence[float] = (0.05, 0.5)) -> nn.Module:
    return BatchRenorm(channels, eps=eps, bn_momentum=bn_momentum, rmax=rmax, dmax=dmax,
                       renorm_warmup=renorm_warmup)
