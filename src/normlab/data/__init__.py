"""Data sets as standardized tensors, and a device-side augmenting batch iterator.

    from normlab.data import load, BatchIterator
    train, test = load("digits")                 # offline; also "synthetic", "cifar10"
    for x, y in BatchIterator(train, 128, augment=True, seed=0, device="cuda"):
        ...

See docs/data.md for the conventions (split, standardization, augmentation, cache folder).
"""

from __future__ import annotations

from normlab.data.base import ArrayDataset, DataError, available, load, register_dataset
from normlab.data.loader import BatchIterator
from normlab.utils.plugins import import_submodules

__all__ = ["ArrayDataset", "BatchIterator", "DataError", "available", "load", "register_dataset"]

import_submodules(__name__)
