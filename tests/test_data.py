"""Data-set registry, digits and synthetic: shapes, split, standardization against brute force."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from normlab.data import ArrayDataset, available, load, register_dataset
from normlab.utils.config import ConfigError


def raw_pixels(data: ArrayDataset) -> np.ndarray:
    """Undo the standardization: (N, C*H*W) float64."""
    mean = np.array(data.mean)[:, None, None]
    std = np.array(data.std)[:, None, None]
    return (data.x.double().numpy() * std + mean).reshape(len(data), -1)


def test_registry_lists_the_data_sets_and_refuses_unknown_names_and_options():
    assert {"digits", "synthetic", "cifar10"} <= set(available())
    with pytest.raises(ConfigError, match=r"'data'.*'digits'.*'mnist'"):
        load("mnist")
    with pytest.raises(ConfigError, match=r"'n_trian'.*'n_train'"):
        load("synthetic", n_trian=5)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(lambda root: None)


def test_digits_shapes_and_augmentation_defaults():
    train, test = load("digits")
    assert train.x.shape == (1347, 1, 8, 8) and test.x.shape == (450, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.num_classes == 10 and set(train.y.tolist()) == set(range(10))
    assert (train.pad, train.flip) == (1, False)
    assert len(train) == 1347 and train.to("cpu") is train


def test_digits_split_is_a_stratified_partition_of_all_images():
    train, test = load("digits")
    bunch = load_digits()
    pixels = bunch.data / 16.0  # the documented scaling, before standardization
    restored = np.concatenate([raw_pixels(train), raw_pixels(test)])
    np.testing.assert_allclose(restored.sum(), pixels.sum(), rtol=1e-6)
    # each image lands in exactly one split: compare the rows as sorted multisets
    key = lambda a: np.lexsort(np.round(a * 16).T[::-1])  # noqa: E731
    np.testing.assert_allclose(np.round(restored * 16)[key(restored)],
                               np.round(pixels * 16)[key(pixels)])
    counts = np.bincount(bunch.target, minlength=10)
    test_counts = np.bincount(test.y.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.25 * counts) <= 1), (test_counts, counts)


def test_digits_split_is_fixed_by_its_seed():
    a, _ = load("digits")
    b, _ = load("digits")
    c, _ = load("digits", split_seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.y, c.y)
    small, _ = load("digits", test_fraction=0.5)
    assert len(small) in (898, 899)
    with pytest.raises(ConfigError, match="'test_fraction'"):
        load("digits", test_fraction=1.5)


def test_digits_standardized_with_training_statistics():
    train, test = load("digits")
    raw_train = raw_pixels(train)
    assert train.mean[0] == pytest.approx(raw_train.mean(), rel=1e-6)
    assert train.std[0] == pytest.approx(raw_train.std(), rel=1e-5)
    assert abs(train.x.double().mean()) < 1e-5 and abs(train.x.double().std() - 1) < 1e-3
    assert abs(test.x.double().mean()) > 1e-4  # test statistics were not used


def test_synthetic_is_seeded_balanced_and_shaped():
    train, test = load("synthetic", n_train=60, n_test=30, shape=(2, 5, 7), num_classes=3, seed=4)
    again, _ = load("synthetic", n_train=60, n_test=30, shape=(2, 5, 7), num_classes=3, seed=4)
    other, _ = load("synthetic", n_train=60, n_test=30, shape=(2, 5, 7), num_classes=3, seed=5)
    assert train.x.shape == (60, 2, 5, 7) and test.x.shape == (30, 2, 5, 7)
    assert torch.equal(train.x, again.x) and not torch.equal(train.x, other.x)
    assert np.bincount(train.y.numpy()).tolist() == [20, 20, 20]
    assert train.num_classes == 3 and train.flip and train.pad == 1
    means = train.x.double().mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.zeros(2, dtype=torch.float64), atol=1e-6)


def test_synthetic_is_learnable():
    """A nearest-class-mean classifier fitted on train classifies most of test: learnable signal."""
    train, test = load("synthetic")
    means = torch.stack([train.x[train.y == c].mean(0) for c in range(train.num_classes)])
    distances = torch.cdist(test.x.flatten(1), means.flatten(1))
    accuracy = (distances.argmin(1) == test.y).float().mean().item()
    assert accuracy > 0.9, accuracy
    chance_train, chance_test = load("synthetic", signal=0.0)
    means = torch.stack([chance_train.x[chance_train.y == c].mean(0) for c in range(10)])
    distances = torch.cdist(chance_test.x.flatten(1), means.flatten(1))
    assert (distances.argmin(1) == chance_test.y).float().mean().item() < 0.3


@pytest.mark.parametrize(("options", "setting"), [
    ({"shape": (3, 8)}, "shape"),
    ({"num_classes": 1}, "num_classes"),
    ({"n_train": 0}, "n_train"),
    ({"signal": -1.0}, "signal"),
])
def test_synthetic_refuses_bad_options(options, setting):
    with pytest.raises(ConfigError, match=repr(setting)):
        load("synthetic", **options)


def test_the_docs_example_runs():
    text = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/data.md", "exec"), {})


@pytest.mark.parametrize("options", [{}, {"test_fraction": 0.5}, {"test_fraction": 0.1},
                                     {"test_fraction": 0.333}, {"test_fraction": 0.9}])
def test_the_digits_check_gives_the_training_size_the_loader_returns(options):
    from normlab.data.base import check_dataset

    assert check_dataset("digits", **options) == len(load("digits", **options)[0])


def test_the_synthetic_check_gives_the_training_size_the_loader_returns():
    from normlab.data.base import check_dataset

    assert check_dataset("synthetic", n_train=37) == len(load("synthetic", n_train=37)[0]) == 37
    with pytest.raises(ConfigError, match="'shape' setting"):
        check_dataset("synthetic", shape=[3, 8])


@pytest.mark.parametrize("fraction", [0.005, 0.0056, 0.994, 0.995])
def test_a_digits_split_without_every_class_on_both_sides_is_refused_as_sklearn_would(fraction):
    """Ground truth: scikit-learn's stratified split itself."""
    from sklearn.model_selection import train_test_split

    from normlab.data.base import check_dataset

    labels = load_digits().target
    try:
        train_test_split(labels, test_size=fraction, random_state=0, stratify=labels)
        splits = True
    except ValueError:
        splits = False
    if splits:
        assert check_dataset("digits", test_fraction=fraction) == len(
            load("digits", test_fraction=fraction)[0])
    else:
        for call in (check_dataset, load):
            with pytest.raises(ConfigError, match="The 'test_fraction' setting must leave both"):
                call("digits", test_fraction=fraction)


def test_the_cifar10_check_finds_the_cache_or_says_why_it_cannot_be_had(tmp_path):
    """Nothing is loaded: a cached npz is only looked for; without one, download=False or an
    address that does not answer is a DataError naming what to do."""
    from normlab.data import DataError
    from normlab.data.base import check_dataset
    from normlab.data.cifar10 import ARCHIVE, MD5

    unreachable = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # the discard port: refused
    with pytest.raises(DataError, match=f"cannot be reached to download it.*{ARCHIVE}"):
        check_dataset("cifar10", root=tmp_path, url=unreachable)
    with pytest.raises(DataError, match=r"not in the cache .* and download=False"):
        check_dataset("cifar10", root=tmp_path, download=False)
    assert check_dataset("cifar10", root=tmp_path, present=False, url=unreachable) == 50000
    (tmp_path / ARCHIVE).write_bytes(b"not the archive")  # wrong md5: not a cache
    with pytest.raises(DataError, match="download=False"):
        check_dataset("cifar10", root=tmp_path, download=False)
    (tmp_path / f"cifar-10-{MD5}.npz").write_bytes(b"")
    assert check_dataset("cifar10", root=tmp_path, download=False) == 50000
    assert check_dataset("cifar10", root=tmp_path, limit_train=100) == 100
    with pytest.raises(ConfigError, match="'limit_train'"):
        check_dataset("cifar10", root=tmp_path, limit_train=0)
