"""`BatchIterator`: mini-batches from a data set kept on the run's device, augmented there.

Augmentation is the standard CIFAR recipe done on whole batches as tensors: zero-pad by `pad`
pixels, take a random HxW crop (offsets uniform in [0, 2*pad] per image and axis), and mirror
left-right with probability 1/2 if `flip`. Crop and flip are one gather with per-image index
arithmetic; no Python loop runs over images.

Randomness: one CPU `torch.Generator` seeded with `seed` draws, per epoch, the permutation, the
crop offsets and the flips (a few N-sized integer tensors, moved to the device once per epoch).
The same seed therefore gives the same batches on CPU and GPU, and each epoch differs from the
last. Cost: one index_select plus, when augmenting, one padded copy and one gather per batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from normlab.data.base import ArrayDataset
from normlab.utils.config import ConfigError, check_interval


class BatchIterator:
    """Each `iter()` is one epoch of (x, y) batches on `device`; `len()` is batches per epoch.

    `pad` and `flip` default to the data set's (`dataset.pad`, `dataset.flip`) and only act when
    `augment=True`. The last batch is smaller than `batch_size` unless `drop_last=True`.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, *, shuffle: bool = True,
                 augment: bool = False, pad: int | None = None, flip: bool | None = None,
                 drop_last: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        check_interval("batch_size", batch_size, 1, kind=int, low_open=False)
        pad = dataset.pad if pad is None else pad
        flip = dataset.flip if flip is None else flip
        check_interval("pad", pad, 0, kind=int, low_open=False)
        check_interval("seed", seed, 0, 2**63 - 1, kind=int, low_open=False)
        if drop_last and batch_size > len(dataset):
            raise ConfigError(
                f"The 'batch_size' setting must be at most the data set size {len(dataset)} "
                f"when drop_last=True (otherwise an epoch has no batch); got {batch_size}.")
        self.dataset = dataset.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.pad = pad
        self.flip = bool(flip)
        self.drop_last = drop_last
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def generator(self) -> torch.Generator:
        """The generator of batch orders and augmentation (its state is the data position)."""
        return self._generator

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = len(self.dataset), self.dataset.device
        gen = self._generator
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(device)
        if self.augment:
            offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen).to(device)
            mirror = torch.rand(n, generator=gen) < 0.5
            mirror = (mirror & self.flip).to(device)
        for b in range(len(self)):
            positions = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order[positions]
            x = self.dataset.x.index_select(0, index)
            if self.augment:
                x = crop_and_flip(x, self.pad, offsets[positions], mirror[positions])
            yield x, self.dataset.y.index_select(0, index)

def crop_and_flip(x: torch.Tensor, pad: int, offsets: torch.Tensor,
                  mirror: torch.Tensor) -> torch.Tensor:
    """Per image i: zero-pad x[i] by `pad`, crop HxW at (row, col) = offsets[i], and mirror it
    left-right where mirror[i]. x (B, C, H, W), offsets (B, 2) ints in [0, 2*pad], mirror (B,)."""
    batch, channels, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x  # (B, C, H+2p, W+2p)
    rows = offsets[:, :1] + torch.arange(height, device=x.device)  # (B, H)
    cols_forward = torch.arange(width, device=x.device)
    cols = offsets[:, 1:] + torch.where(mirror[:, None], cols_forward.flip(0), cols_forward)
    return padded[
        torch.arange(batch, device=x.device)[:, None, None, None],
        torch.arange(channels, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]  # (B, C, H, W)
