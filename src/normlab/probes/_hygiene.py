"""Probe hygiene: a probe must leave the model exactly as it found it.

`preserved(model)` snapshots parameters, buffers (BN running statistics included), train/eval
modes, requires_grad flags, .grad tensors and the RNG states, and restores all of them on exit,
even when the probe raises. Probes never write parameters or buffers (they run functionally,
`_stateless`); a tensor is copied back only if it did change, so an untouched model keeps its
version counters and a graph built before the probe still back-propagates. `bn_mode(model)`
names the normalization mode a number was taken in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Restore `model` (and the global RNG states) to exactly their current state on exit."""
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: None if p.grad is None else p.grad.detach().clone()
             for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    modes = {name: m.training for name, m in model.named_modules()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                _restore(p, params[name])
                p.requires_grad_(flags[name])
                p.grad = grads[name]
            for name, b in model.named_buffers():
                _restore(b, buffers[name])
        for name, m in model.named_modules():
            m.training = modes[name]
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _restore(tensor: torch.Tensor, saved: torch.Tensor) -> None:
    """Copy `saved` back into `tensor` only if it changed (a copy bumps the version counter)."""
    if not torch.equal(tensor, saved):
        tensor.copy_(saved)


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, normalization layers in train mode use batch statistics but do not
    update their running statistics (momentum 0; BatchRenorm is a torch `_BatchNorm` subclass
    and follows the same convention).
    """
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            saved.append((module, module.momentum, module.num_batches_tracked.clone()
                          if module.num_batches_tracked is not None else None))
            module.momentum = 0.0
    try:
        yield model
    finally:
        for module, momentum, tracked in saved:
            module.momentum = momentum
            if tracked is not None:
                _restore(module.num_batches_tracked, tracked)


def bn_mode(model: nn.Module) -> str:
    """'train' (batch statistics) or 'eval' (running statistics): the mode a probe ran in."""
    return "train" if model.training else "eval"
