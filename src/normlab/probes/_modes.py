"""The mode a probe measures in, stated by the caller and never imposed on other layers.

- "train": normalization layers use batch statistics; every other module (Dropout included) is
  put in eval mode, so the measured function is deterministic.
- "eval": the whole model in eval mode (running statistics, no Dropout).
- "keep": the model as it is (a user's frozen BN stays frozen; Dropout stays as set).

Modes are restored on exit. Running statistics are never updated by a probe (see
`_stateless.Stateless`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from normlab.config import check_choice
from normlab.probes._modules import is_norm

MODES = ("train", "eval", "keep")


@contextlib.contextmanager
def probe_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Put `model` in `mode` (see the module docstring) for the block; restore every flag."""
    check_choice("mode", mode, MODES)
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode != "keep":
            for module in model.modules():
                module.training = mode == "train" and is_norm(module)
        yield model
    finally:
        for module, training in saved:
            module.training = training


def norm_mode(model: nn.Module, mode: str = "keep") -> str:
    """'train' if any normalization layer uses batch statistics now, else 'eval' (the `bn_mode`
    of a record). A model without norm layers reports the `mode` asked for ("train"/"eval"), or
    under "keep" its own top-level mode."""
    norms = [m for m in model.modules() if is_norm(m)]
    if not norms:
        return mode if mode != "keep" else ("train" if model.training else "eval")
    return "train" if any(m.training for m in norms) else "eval"


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
