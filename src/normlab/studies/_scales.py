"""A study's scales: smoke (digits, CPU, minutes), reduced (one GPU, hours, CIFAR-10), paper (the
paper's set-up), each a frozen `ScaleConfig` dataclass of the study built by keyword."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from normlab.runs.spec import RunSpec
from normlab.utils.config import ConfigError, check_choice

SCALES = ("smoke", "reduced", "paper")
# What the studies' grids share: a CIFAR ResNet with Xavier-normal init (what the paper appears
# to use), SGD with momentum 0.9 and weight decay 5e-4 at a constant learning rate.
RESNET_SETUP = {"model": "resnet", "init": "xavier_normal", "schedule": "constant",
                "momentum": 0.9, "weight_decay": 5e-4}

S = TypeVar("S", bound="ScaleConfig")


@dataclass(frozen=True)
class ScaleConfig:
    """Base of a study's per-scale settings: a frozen dataclass built by keyword.

    `ScaleClass.make(**fields)` (and `config.replace(**changes)`) report unknown or missing
    fields as one ConfigError naming the study's valid fields.
    """

    @classmethod
    def make(cls: type[S], **fields: Any) -> S:
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls)
                    if dataclasses.MISSING is f.default is f.default_factory]
        problems = [f"Unknown field {k!r} of {cls.__name__}; its fields are "
                    f"{', '.join(names)}." for k in fields if k not in names]
        problems += [f"The field {k!r} of {cls.__name__} is required." for k in required
                     if k not in fields]
        if problems:
            raise ConfigError(problems)
        return cls(**fields)

    def replace(self: S, **changes: Any) -> S:
        return type(self).make(**{**dataclasses.asdict(self), **changes})


@dataclass(frozen=True)
class TrainScale(ScaleConfig):
    """The fields of a study whose runs train one ResNet per norm and lr: its depth, width,
    batch size and number of steps, the norms and the lr grid."""

    depth: int
    width: int
    batch_size: int
    steps: int
    norms: tuple[str, ...]
    lrs: tuple[float, ...]


def resnet_spec(data: str, **settings: Any) -> RunSpec:
    """A RunSpec of the shared set-up (RESNET_SETUP) on `data`; `settings` add to or replace it."""
    return RunSpec(**{**RESNET_SETUP, "data": data, **settings})


def pick_scale(scales: Mapping[str, S], scale: str) -> S:
    """The configuration of `scale`; a ConfigError naming the study's scales otherwise."""
    check_choice("scale", scale, list(scales))
    return scales[scale]


def check_scale(scale: str) -> None:
    check_choice("scale", scale, SCALES)


def default_data(scale: str, data: str | None) -> str:
    """The bundled digits at smoke scale, CIFAR-10 above it, unless `data` says otherwise."""
    check_scale(scale)
    return data or ("digits" if scale == "smoke" else "cifar10")
