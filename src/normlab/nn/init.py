"""Weight initialization by name: `initialize(model, scheme, gain=1.0, seed=None)`.

Every conv and linear layer gets its weight from the scheme and a zero bias; every
normalization layer gets weight 1, bias 0 and fresh running statistics. The exception is
"torch_default", which re-runs each layer's own `reset_parameters` (torch's defaults, biases
included).

Schemes (fan_in = c_in * kernel area, fan_out = c_out * kernel area; `gain` multiplies the
standard deviation, bound or orthogonal matrix):

- "xavier_normal":  N(0, gain^2 * 2 / (fan_in + fan_out))
- "xavier_uniform": U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))
- "kaiming_normal": N(0, gain^2 * 2 / fan_in)  (He et al. 2015, for ReLU);
  "kaiming_normal_fan_out" uses fan_out.
- "orthogonal": the weight as a (c_out, c_in * kernel area) matrix with orthonormal rows or
  columns (whichever is fewer), times gain.
- "delta_orthogonal" (Xiao et al. 2018): convs get an orthogonal c_out x c_in matrix at the
  kernel's centre tap and zeros elsewhere (W^T W = I, so with c_in <= c_out a conv with circular
  padding preserves the norm of every input). A conv with c_in > c_out cannot be
  norm-preserving and is refused with a ConfigError naming the layer; so is an even kernel,
  which has no centre tap. Linear layers get "orthogonal" (a 1x1 conv's centre tap is the
  whole kernel), including a narrowing classifier head.

Determinism: with `seed`, all draws come from a private `torch.Generator` on the CPU (the values
are then copied to the layer's device and dtype) and the global RNG is not touched, so the same
seed gives the same weights on every device. Without `seed` the global RNG is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from normlab.utils.config import ConfigError, check_interval
from normlab.utils.registry import Registry

Generator = torch.Generator | None
# A scheme fills one conv or linear module in place: fn(layer_name, module, gain, generator).
InitScheme = Callable[[str, nn.Module, float, Generator], None]
_INITS: Registry[InitScheme] = Registry("init")
_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def register_init(name: str, *, overwrite: bool = False) -> Callable[[InitScheme], InitScheme]:
    """Register `fn(layer_name, module, gain, generator)` that initializes one conv/linear layer.

    For schemes that only draw a weight, decorate a sampler with `weight_sampler` first.
    """
    return _INITS.register(name, overwrite=overwrite)


def list_inits() -> list[str]:
    """The registered initialization schemes, in registration order."""
    return _INITS.names()


def initialize(model: nn.Module, scheme: str, gain: float = 1.0,
               seed: int | None = None) -> nn.Module:
    """Initialize every conv/linear and normalization layer of `model` in place; returns it.

    Layers are visited in registration order (`model.named_modules()`), so a seed fixes every
    value. Raises ConfigError for an unknown scheme, a bad gain, or a layer the scheme cannot
    initialize (delta_orthogonal with c_in > c_out).
    """
    fill = _INITS.get(scheme)
    check_interval("init_gain", gain, 0.0)
    if seed is not None:
        check_interval("seed", seed, 0, kind=int, low_open=False)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    # torch_default draws from the global RNGs of the layers' devices: with a seed, seed private
    # copies of exactly those (torch.manual_seed would also touch every CUDA device's RNG).
    cuda = sorted({p.device.index for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda, enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
        for name, module in model.named_modules():
            if isinstance(module, _WEIGHT_LAYERS):
                fill(name, module, float(gain), generator)
            elif isinstance(module, _NORM_LAYERS):
                _reset_norm(module)
    return model


def _reset_norm(module: nn.Module) -> None:
    if getattr(module, "weight", None) is not None:
        module.weight.fill_(1.0)
    if getattr(module, "bias", None) is not None:
        module.bias.zero_()
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
        module.reset_running_stats()


Sampler = Callable[[str, torch.Size, float, Generator], torch.Tensor]


def weight_sampler(sample: Sampler) -> InitScheme:
    """Turn `sample(layer_name, shape, gain, generator) -> CPU tensor` into a scheme that sets
    the weight to the sample (cast to the layer's device and dtype) and zeroes the bias.
    """

    def scheme(name: str, module: nn.Module, gain: float, generator: Generator) -> None:
        values = sample(name, module.weight.shape, gain, generator)
        module.weight.copy_(values.to(module.weight.dtype))
        if module.bias is not None:
            module.bias.zero_()

    scheme.__doc__ = sample.__doc__
    return scheme


def _fans(shape: torch.Size) -> tuple[int, int]:
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _normal(shape: torch.Size, std: float, generator: Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float64).normal_(0.0, std, generator=generator)


def _orthogonal(rows: int, cols: int, generator: Generator) -> torch.Tensor:
    """A Haar-distributed (rows, cols) matrix with orthonormal rows or columns (fewer of them)."""
    a = torch.empty(max(rows, cols), min(rows, cols), dtype=torch.float64)
    a.normal_(0.0, 1.0, generator=generator)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)  # Haar, not biased
    return q if rows >= cols else q.T


@register_init("torch_default")
def _torch_default(name: str, module: nn.Module, gain: float, generator: Generator) -> None:
    """torch's own reset_parameters (Kaiming-uniform with a = sqrt(5), uniform bias); gain
    scales the weight."""
    module.reset_parameters()
    module.weight.mul_(gain)


@register_init("xavier_normal")
@weight_sampler
def _xavier_normal(name: str, shape: torch.Size, gain: float, generator: Generator) -> torch.Tensor:
    fan_in, fan_out = _fans(shape)
    return _normal(shape, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator)


@register_init("xavier_uniform")
@weight_sampler
def _xavier_uniform(name: str, shape: torch.Size, gain: float,
                    generator: Generator) -> torch.Tensor:
    fan_in, fan_out = _fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)


@register_init("kaiming_normal")
@weight_sampler
def _kaiming_normal(name: str, shape: torch.Size, gain: float,
                    generator: Generator) -> torch.Tensor:
    fan_in, _ = _fans(shape)
    return _normal(shape, gain * math.sqrt(2.0 / fan_in), generator)


@register_init("kaiming_normal_fan_out")
@weight_sampler
def _kaiming_normal_fan_out(name: str, shape: torch.Size, gain: float,
                            generator: Generator) -> torch.Tensor:
    _, fan_out = _fans(shape)
    return _normal(shape, gain * math.sqrt(2.0 / fan_out), generator)


@register_init("orthogonal")
@weight_sampler
def _orthogonal_init(name: str, shape: torch.Size, gain: float,
                     generator: Generator) -> torch.Tensor:
    rows, cols = shape[0], math.prod(shape[1:])
    return (gain * _orthogonal(rows, cols, generator)).reshape(shape)


@register_init("delta_orthogonal")
@weight_sampler
def _delta_orthogonal(name: str, shape: torch.Size, gain: float,
                      generator: Generator) -> torch.Tensor:
    c_out, c_in, kernel = shape[0], shape[1], tuple(shape[2:])
    if not kernel:  # a linear layer
        return gain * _orthogonal(c_out, c_in, generator)
    if c_in > c_out:
        raise ConfigError(f"The 'init' setting 'delta_orthogonal' needs c_in <= c_out in every "
                          f"conv; layer {name!r} has c_in={c_in} > c_out={c_out}. Use "
                          "'orthogonal' or another scheme for this model.")
    if any(k % 2 == 0 for k in kernel):
        raise ConfigError(f"The 'init' setting 'delta_orthogonal' needs odd kernel sizes (a "
                          f"centre tap); layer {name!r} has kernel {kernel}.")
    weight = torch.zeros(shape, dtype=torch.float64)
    centre = (slice(None), slice(None), *(k // 2 for k in kernel))
    weight[centre] = gain * _orthogonal(c_out, c_in, generator)
    return weight
