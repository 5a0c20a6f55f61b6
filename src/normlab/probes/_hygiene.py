"""Probe hygiene: a probe must leave the model exactly as it found it, and measure in full float32.

`preserved(model)` snapshots parameters, buffers (BN running statistics included), train/eval
modes, requires_grad flags, .grad tensors and the RNG states, and restores all of them on exit,
even when the probe raises. Probes never write parameters or buffers (they run functionally,
`_stateless`); a tensor is copied back only if it did change, so an untouched model keeps its
version counters and a graph built before the probe still back-propagates. Inside the block,
float32 arithmetic is exact IEEE float32 (`exact_float32`: no TF32 on CUDA matmuls and cuDNN,
no bf16/TF32 in oneDNN on a CPU); the previous settings are restored on exit. `bn_mode(model)`
names the normalization mode a number was taken in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

# torch's per-backend, per-operation float32 precision settings ("ieee", "tf32", "bf16" or
# "none": inherit from the level above); "all" is the level above the operations
FLOAT32_SETTINGS = (("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"),
                    ("cuda", "rnn"), ("mkldnn", "all"), ("mkldnn", "matmul"),
                    ("mkldnn", "conv"), ("mkldnn", "rnn"))


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Restore `model` (and the global RNG states) to exactly their current state on exit; run
    the block in exact float32 (`exact_float32`)."""
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: None if p.grad is None else p.grad.detach().clone()
             for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    modes = {name: m.training for name, m in model.named_modules()}
    rng = RngStates.now()
    try:
        with exact_float32():
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
        rng.restore()


@dataclass
class RngStates:
    """The global RNG states (CPU, and every CUDA device once CUDA is initialized)."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def now(cls) -> RngStates:
        return cls(torch.get_rng_state(),
                   torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)

    def restore(self) -> None:
        """Set the RNGs back to these states (host calls; allowed between CUDA-graph replays,
        which then draw from the restored state)."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 matmuls and convolutions in full IEEE float32 inside the block: TF32 off for
    cuBLAS and cuDNN (torch turns it on for cuDNN convolutions by default; it costs ~3 of the 7
    decimal digits), bf16/TF32 off for oneDNN on a CPU. Both torch APIs are set (the legacy
    `allow_tf32` / `set_float32_matmul_precision` flags, which cuBLAS checks against the newer
    per-operation `fp32_precision` settings) and both restored on exit. Costs nothing on a CPU;
    on a GPU float32 convolutions and matmuls run at full float32 speed instead of TF32's.
    """
    get, put = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
    saved = {key: get(*key) for key in FLOAT32_SETTINGS}
    matmul = _legacy_matmul_precision(saved)
    cudnn = _readable(lambda: torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    for key in FLOAT32_SETTINGS:
        put(*key, "ieee")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        if cudnn is not None:
            torch.backends.cudnn.allow_tf32 = cudnn
        for key, value in saved.items():
            put(*key, value)


def _legacy_matmul_precision(settings: dict[tuple[str, str], str]) -> str:
    """torch's legacy float32 matmul precision; where torch refuses to report it (the newer API
    set it to a state the legacy one cannot name), the value that agrees with the cuBLAS setting,
    which is what cuBLAS checks."""
    value = _readable(torch.get_float32_matmul_precision)
    if value is not None:
        return value
    cuda = next((settings[key] for key in (("cuda", "matmul"), ("cuda", "all"), ("generic", "all"))
                 if settings[key] != "none"), "none")
    return "high" if cuda == "tf32" else "highest"


def _readable(read):
    """`read()`, or None where torch refuses to report a legacy flag (RuntimeError)."""
    try:
        return read()
    except RuntimeError:
        return None


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
