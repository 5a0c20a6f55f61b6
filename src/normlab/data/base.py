"""Data sets as tensors in memory: `ArrayDataset`, the data-set registry and `load(name)`.

Every data set is returned already standardized per channel with statistics of its *training*
split, so the test split of a standardized data set does not have exactly zero mean.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.utils.config import ConfigError
from normlab.utils.registry import Registry

Loader = Callable[..., "tuple[ArrayDataset, ArrayDataset]"]
_DATASETS: Registry[Loader] = Registry("data")
SizeCheck = Callable[..., int]
_CHECKS: Registry[SizeCheck] = Registry("data check")


class DataError(RuntimeError):
    """A data file is missing, cannot be fetched, or is corrupt; the message names the file."""


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images `x` (N, C, H, W) float32, standardized per channel, and labels `y` (N,) int64.

    `pad` is the default zero-padding of the random-crop augmentation and `flip` says whether a
    horizontal flip keeps the label (true for CIFAR-10, false for digits). `mean` and `std` are
    the per-channel statistics of the training split that were subtracted and divided out.
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str
    num_classes: int
    pad: int
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Internal invariants: loaders build these, users do not.
        assert self.x.dim() == 4 and self.x.dtype == torch.float32, (self.x.shape, self.x.dtype)
        assert self.y.shape == (self.x.shape[0],) and self.y.dtype == torch.int64, self.y.shape
        assert len(self.mean) == len(self.std) == self.x.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: str | torch.device) -> ArrayDataset:
        """The same data set with `x` and `y` on `device` (self if already there)."""
        device = torch.device(device)
        if self.x.device == device:
            return self
        return dataclasses.replace(self, x=self.x.to(device), y=self.y.to(device))


def register_dataset(name: str, *, overwrite: bool = False) -> Callable[[Loader], Loader]:
    """Register `fn(root, **options) -> (train, test)` under `name`.

    The options a data set accepts are the keyword-only parameters of `fn`, each with a default.
    """
    return _DATASETS.register(name, overwrite=overwrite)


def register_dataset_check(name: str, *, overwrite: bool = False
                           ) -> Callable[[SizeCheck], SizeCheck]:
    """Register `fn(root, present, **options) -> int` for data set `name`: the number of
    training images `load(name, root, **options)` would return, found without loading them. It
    takes the loader's options and raises ConfigError for a bad option value; with `present`
    true it also raises DataError when the data cannot be had (not cached, and not
    downloadable). `normlab run` calls it before the first run (`check_dataset`), so that these
    mistakes cost no run.
    """
    return _CHECKS.register(name, overwrite=overwrite)


def check_dataset(name: str, root: str | os.PathLike | None = None, *, present: bool = True,
                  **options: Any) -> int | None:
    """The training split's size of data set `name` with `options`, from its registered check
    (cheap: no data is loaded); None when the data set registered no check (a plugin's: its
    options are then checked by name only). ConfigError for an unknown name, option or a bad
    value; with `present`, DataError when the data cannot be had (for CIFAR-10 not cached and
    its address not answering: a network request)."""
    problems = option_problems(name, options)
    if problems:
        raise ConfigError(problems)
    return _CHECKS.get(name)(root, present, **options) if name in _CHECKS else None


def option_problems(name: str, options: Mapping[str, Any]) -> list[str]:
    """The options `options` that data set `name`'s loader does not take, one sentence each
    (ConfigError for an unknown data set)."""
    loader = _DATASETS.get(name)
    allowed = [p.name for p in inspect.signature(loader).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return [f"The data set {name!r} has no option {key!r}; its options are "
            f"{', '.join(repr(a) for a in allowed) or 'none'}."
            for key in sorted(set(options) - set(allowed))]


def available() -> list[str]:
    """Names of the registered data sets."""
    return _DATASETS.names()


def load(name: str, root: str | os.PathLike | None = None,
         **options: Any) -> tuple[ArrayDataset, ArrayDataset]:
    """The (train, test) splits of data set `name`, standardized with training statistics.

    `root` is the cache folder for downloaded data (default: $NORMLAB_DATA, else
    ~/.cache/normlab); data sets that need no files ignore it. An unknown name or option raises
    ConfigError listing what is allowed.
    """
    problems = option_problems(name, options)
    if problems:
        raise ConfigError(problems)
    return _DATASETS.get(name)(root, **options)


def cache_dir(root: str | os.PathLike | None) -> Path:
    """`root`, else $NORMLAB_DATA, else ~/.cache/normlab (not created here)."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("NORMLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "normlab"


def standardized_pair(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    num_classes: int,
    pad: int,
    flip: bool,
    stats_from: torch.Tensor | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Standardize both splits per channel with the mean and std of `stats_from` (default: the
    training images); statistics in float64 (in chunks, so uint8 CIFAR-10 needs no float64 copy),
    outputs float32 ArrayDatasets."""
    mean, std = channel_stats(train[0] if stats_from is None else stats_from)

    def make(x: torch.Tensor, y: torch.Tensor) -> ArrayDataset:
        z = x.to(torch.float32, copy=True)  # in place below: no second full-size temporary
        z.sub_(mean.float()[:, None, None]).div_(std.float()[:, None, None])
        return ArrayDataset(
            x=z.contiguous(), y=y.to(torch.int64), name=name,
            num_classes=num_classes, pad=pad, flip=flip,
            mean=tuple(mean.tolist()), std=tuple(std.tolist()),
        )

    return make(*train), make(*test)


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std (float64, shape (C,)) of images x (N, C, H, W).

    uint8 images (CIFAR-10) are counted exactly with a 256-bin histogram per channel; other
    dtypes are summed in float64 chunks of `chunk` images.
    """
    if x.dtype == torch.uint8:
        counts = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256)
                              for c in range(x.shape[1])]).to(torch.float64)  # (C, 256)
        values = torch.arange(256, dtype=torch.float64)
        count = counts.sum(dim=1)
        mean = counts @ values / count
        var = (counts * (values - mean[:, None]).square()).sum(dim=1) / count
        return mean, var.sqrt().clamp_min(1e-12)
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk].to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return mean, var.sqrt().clamp_min(1e-12)
