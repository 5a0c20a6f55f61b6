"""A study's scales: smoke (digits, CPU, minutes), reduced (one GPU, hours, CIFAR-10), paper (the
paper's set-up), each a frozen `ScaleConfig` dataclass of the study built by keyword."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from normlab.config import ConfigError, check_choice

SCALES = ("smoke", "reduced", "paper")

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
