"""A seeded synthetic image data set of any shape and class count, learnable by small models.

Each class c has a mean image mu_c = per-channel offset + a smooth spatial pattern, both drawn
from N(0, 1) with the data seed; an example is x = signal * mu_c + N(0, 1) noise. The pattern is
made left-right symmetric and smooth (3x3 box blur), so a horizontal flip keeps the class mean
exactly and a small random crop nearly so: the default augmentation (pad = max(1, H // 8),
flip=True) is label-preserving. Labels are balanced (class c gets every num_classes-th example)
and shuffled. Both splits are standardized with training statistics like the real data sets.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from normlab.data.base import (
    ArrayDataset,
    register_dataset,
    register_dataset_check,
    standardized_pair,
)
from normlab.utils.config import ConfigError, check_interval


@register_dataset("synthetic")
def load_synthetic(root: str | os.PathLike | None = None, *, n_train: int = 512,
                   n_test: int = 256, shape: tuple[int, int, int] = (3, 8, 8),
                   num_classes: int = 10, signal: float = 1.0,
                   seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) splits of class-mean-plus-noise images of `shape` (C, H, W)."""
    synthetic_train_size(root, n_train=n_train, n_test=n_test, shape=shape,
                         num_classes=num_classes, signal=signal, seed=seed)
    channels, height, width = shape
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randn(num_classes, channels, 1, 1, generator=gen)
    pattern = torch.randn(num_classes, channels, height, width, generator=gen)
    pattern = F.avg_pool2d(pattern, 3, stride=1, padding=1, count_include_pad=False)
    pattern = (pattern + pattern.flip(-1)) / 2  # left-right symmetric
    means = signal * (offsets + pattern)  # (classes, C, H, W)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        x = means[y] + torch.randn(n, channels, height, width, generator=gen)
        return x, y

    train, test = split(n_train), split(n_test)
    return standardized_pair("synthetic", train, test, num_classes=num_classes,
                             pad=max(1, height // 8), flip=True)


@register_dataset_check("synthetic")
def synthetic_train_size(root: str | os.PathLike | None = None, present: bool = True,
                         *, n_train: int = 512, n_test: int = 256,
                         shape: tuple[int, int, int] = (3, 8, 8),
                         num_classes: int = 10, signal: float = 1.0, seed: int = 0) -> int:
    """`n_train`, once every option is checked (ConfigError naming a bad one)."""
    check_interval("n_train", n_train, 1, kind=int, low_open=False)
    check_interval("n_test", n_test, 1, kind=int, low_open=False)
    check_interval("num_classes", num_classes, 2, kind=int, low_open=False)
    check_interval("signal", signal, 0.0, low_open=False)
    check_interval("seed", seed, 0, 2**63 - 1, kind=int, low_open=False)
    if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ConfigError(f"The 'shape' setting must be (C, H, W), three ints >= 1; got {shape!r}.")
    return n_train
