"""scikit-learn's bundled 8x8 handwritten digits: the offline default data set (no download).

1797 grey-scale images (N, 1, 8, 8), 10 classes, pixel values 0..16 scaled to [0, 1], then
standardized with the training split's mean and std. The train/test split is stratified by class
and fixed by `split_seed`, so every run on "digits" sees the same split.

Augmentation defaults: pad=1 (a 1-pixel shift is 1/8 of the image, like 4 pixels on CIFAR's 32)
and flip=False, because mirrored digits are not digits (a flipped 2, 3, 4, 5, 6, 7 or 9 is not the
same class).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from normlab.data.base import (
    ArrayDataset,
    register_dataset,
    register_dataset_check,
    standardized_pair,
)
from normlab.utils.config import ConfigError, check_interval

IMAGES = 1797  # scikit-learn's load_digits
CLASSES = 10


@register_dataset("digits")
def load_digits(root: str | os.PathLike | None = None, *, test_fraction: float = 0.25,
                split_seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """The (train, test) digits splits; `test_fraction` of each class goes to test."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits_train_size(root, test_fraction=test_fraction, split_seed=split_seed)  # the checks
    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels)
    return standardized_pair(
        "digits",
        (torch.from_numpy(x_train), torch.from_numpy(y_train)),
        (torch.from_numpy(x_test), torch.from_numpy(y_test)),
        num_classes=10, pad=1, flip=False,
    )


@register_dataset_check("digits")
def digits_train_size(root: str | os.PathLike | None = None, present: bool = True,
                      *, test_fraction: float = 0.25, split_seed: int = 0) -> int:
    """The training images of `load_digits` with these options, without loading them:
    scikit-learn's split puts ceil(test_fraction * 1797) images in test. A stratified split
    needs one image of each of the 10 classes in both splits."""
    check_interval("test_fraction", test_fraction, 0.0, 1.0)
    check_interval("split_seed", split_seed, 0, 2**32 - 1, kind=int, low_open=False,
                   high_open=False)
    test = math.ceil(test_fraction * IMAGES)
    if min(test, IMAGES - test) < CLASSES:
        low, high = CLASSES / IMAGES, (IMAGES - CLASSES) / IMAGES
        raise ConfigError(f"The 'test_fraction' setting must leave both splits of the {IMAGES} "
                          f"digits an image of each of the {CLASSES} classes, so lie in about "
                          f"[{low:.4f}, {high:.4f}]; got {test_fraction!r}.")
    return IMAGES - test
