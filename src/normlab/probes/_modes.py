"""The mode a probe measures in, stated by the caller and never imposed on other layers.

- "train": normalization layers use batch statistics; every other module (Dropout included) is
  put in eval mode, so the measured function is deterministic. A normalization layer is a
  module whose own training flag switches batch coupling on, found by running it
  (`normlab.nn.norm_layers`): a user's own BatchNorm counts whatever its class. A module whose
  flag switches batch statistics and randomness together, or that normlab cannot run alone
  to find out, is refused with a ConfigError naming it (use "keep" with your own flags).
- "eval": the whole model in eval mode (running statistics, no Dropout).
- "keep": the model as it is (a user's frozen BN stays frozen; Dropout stays as set).

Modes are restored on exit. Running statistics are never updated by a probe (see
`_stateless.Stateless`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from normlab.nn.coupling import batch_coupling, norm_layers
from normlab.utils.config import ConfigError, check_choice

MODES = ("train", "eval", "keep")


@contextlib.contextmanager
def probe_mode(model: nn.Module, mode: str, x: torch.Tensor | None) -> Iterator[nn.Module]:
    """Put `model` in `mode` (see the module docstring) for the block; restore every flag.
    `x` is an input batch of the measurement (None when nothing is run on the model: then
    "train" cannot tell the norms and leaves the flags alone)."""
    check_choice("mode", mode, MODES)
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
        elif mode == "train" and x is not None:
            norms = norm_layers(model, x)
            _refuse_unclear(norms.random, norms.unknown)
            chosen = set(norms.names)
            for name, module in model.named_modules():
                module.training = name in chosen
        yield model
    finally:
        for module, training in saved:
            module.training = training


def norm_mode(model: nn.Module, mode: str, x: torch.Tensor | None) -> str:
    """The `bn_mode` of a record: "train" when the model as it is now couples the examples of
    the batch `x` (batch statistics), "eval" when it has normalization layers and none of them
    does; a model without them reports the `mode` asked for ("train"/"eval"), or under "keep"
    its own top-level mode, as does a call without `x`."""
    fallback = mode if mode != "keep" else ("train" if model.training else "eval")
    if x is None:
        return fallback
    coupled = batch_coupling(model, x)
    if coupled:
        return "train"
    names = norm_layers(model, x).names
    modules = dict(model.named_modules())
    if coupled is None and any(modules[n].training for n in names):
        return "train"
    return "eval" if names else fallback


def _refuse_unclear(random: tuple[str, ...], unknown: tuple[tuple[str, str], ...]) -> None:
    problems = [f"module {name!r} switches batch statistics and randomness (e.g. Dropout) with "
                f"the same training flag" for name in random]
    problems += [f"normlab cannot tell whether module {name!r} is a normalization layer: {why}"
                 for name, why in unknown]
    if problems:
        raise ConfigError(f"The 'mode' setting 'train' needs to know which modules are "
                          f"normalization layers; {'; '.join(problems)}. Set the modules' "
                          f"train/eval flags yourself and use mode='keep'.")


def resolve_mode(mode: str | None, bn_mode: str | None, default: str) -> str:
    """The mode to use from `mode` and the deprecated `bn_mode` alias (a DeprecationWarning)."""
    if bn_mode is not None:
        import warnings

        warnings.warn("The 'bn_mode' argument of the probes is deprecated; use mode='train', "
                      "'eval' or 'keep'.", DeprecationWarning, stacklevel=3)
        if mode is None:
            mode = bn_mode
    mode = default if mode is None else mode
    check_choice("mode", mode, MODES)
    return mode
