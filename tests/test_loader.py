"""BatchIterator: epochs, determinism, and the crop/flip distribution against a brute-force twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from normlab.data import ArrayDataset, BatchIterator
from normlab.utils.config import ConfigError


def indexed_dataset(n: int, channels: int = 2, size: int = 4, pad: int = 2,
                    flip: bool = True) -> ArrayDataset:
    """Every pixel of every image holds a distinct positive value, so any crop/flip of any image
    is recognisable; label i % 3."""
    x = torch.arange(1, n * channels * size * size + 1, dtype=torch.float32)
    return ArrayDataset(x=x.reshape(n, channels, size, size), y=torch.arange(n) % 3,
                        name="indexed", num_classes=3, pad=pad, flip=flip,
                        mean=(0.0,) * channels, std=(1.0,) * channels)


def epoch(iterator: BatchIterator) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*iterator, strict=True)
    return torch.cat(xs), torch.cat(ys)


def brute_force_transform(image: np.ndarray, source: np.ndarray, pad: int) -> list[tuple]:
    """All (row offset, col offset, mirrored) whose crop of the zero-padded source equals image."""
    height, width = source.shape[1:]
    padded = np.pad(source, ((0, 0), (pad, pad), (pad, pad)))
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, dy:dy + height, dx:dx + width]
            for mirrored in (False, True):
                candidate = window[:, :, ::-1] if mirrored else window
                if np.array_equal(candidate, image):
                    found.append((dy, dx, mirrored))
    return found


def test_len_and_last_partial_batch():
    data = indexed_dataset(10)
    sizes = [len(x) for x, _ in BatchIterator(data, 4)]
    assert sizes == [4, 4, 2] and len(BatchIterator(data, 4)) == 3
    dropped = BatchIterator(data, 4, drop_last=True)
    assert [len(x) for x, _ in dropped] == [4, 4] and len(dropped) == 2
    assert len(BatchIterator(data, 5, drop_last=True)) == 2


def test_epoch_is_a_permutation_and_unshuffled_is_in_order():
    data = indexed_dataset(11)
    x, y = epoch(BatchIterator(data, 3, seed=1))
    order = ((x[:, 0, 0, 0] - 1) / 32).long()  # first pixel of image i is 1 + 32 i
    assert sorted(order.tolist()) == list(range(11)) and order.tolist() != list(range(11))
    assert torch.equal(x, data.x[order]) and torch.equal(y, data.y[order])
    x, y = epoch(BatchIterator(data, 3, shuffle=False))
    assert torch.equal(x, data.x) and torch.equal(y, data.y)


def test_same_seed_same_batches_and_epochs_differ():
    data = indexed_dataset(20)
    a = BatchIterator(data, 6, augment=True, seed=3)
    b = BatchIterator(data, 6, augment=True, seed=3)
    first_a, second_a = epoch(a), epoch(a)
    first_b, second_b = epoch(b), epoch(b)
    assert torch.equal(first_a[0], first_b[0]) and torch.equal(second_a[0], second_b[0])
    assert not torch.equal(first_a[0], second_a[0])
    other = epoch(BatchIterator(data, 6, augment=True, seed=4))
    assert not torch.equal(first_a[0], other[0])


def test_no_augmentation_unless_asked():
    data = indexed_dataset(30)
    x, _ = epoch(BatchIterator(data, 7, shuffle=False, augment=False))
    assert torch.equal(x, data.x)
    x, _ = epoch(BatchIterator(data, 7, shuffle=False, augment=True, pad=0, flip=False))
    assert torch.equal(x, data.x)


def test_crops_are_exact_windows_with_uniform_offsets_and_half_flips():
    pad, n = 2, 1500
    data = indexed_dataset(n, channels=2, size=4, pad=pad)
    x, _ = epoch(BatchIterator(data, 64, shuffle=False, augment=True, seed=0))
    source, out = data.x.numpy(), x.numpy()
    transforms = []
    for i in range(n):
        found = brute_force_transform(out[i], source[i], pad)
        assert len(found) == 1, (i, found)  # an exact window of the padded image, one way only
        transforms.append(found[0])
    dy, dx, mirrored = np.array(transforms).T
    for offsets in (dy, dx):
        counts = np.bincount(offsets.astype(int), minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1
        assert chisquare(counts).pvalue > 1e-4, counts
    joint = np.bincount((dy * (2 * pad + 1) + dx).astype(int), minlength=(2 * pad + 1) ** 2)
    assert chisquare(joint).pvalue > 1e-4, joint
    flips = mirrored.astype(bool).mean()
    assert abs(flips - 0.5) < 4 * 0.5 / np.sqrt(n), flips


def test_defaults_come_from_the_dataset():
    no_flip = indexed_dataset(200, pad=1, flip=False)
    iterator = BatchIterator(no_flip, 50, shuffle=False, augment=True, seed=0)
    assert iterator.pad == 1 and iterator.flip is False
    x, _ = epoch(iterator)
    source, out = no_flip.x.numpy(), x.numpy()
    found = [brute_force_transform(out[i], source[i], 1)[0] for i in range(len(no_flip))]
    assert not any(mirrored for _, _, mirrored in found)
    assert {dy for dy, _, _ in found} == {0, 1, 2}


@pytest.mark.parametrize(("options", "setting"), [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 4, "pad": -1}, "pad"),
    ({"batch_size": 50, "drop_last": True}, "batch_size"),
    ({"batch_size": 4, "seed": -2}, "seed"),
])
def test_bad_settings_are_refused(options, setting):
    with pytest.raises(ConfigError, match=repr(setting)):
        BatchIterator(indexed_dataset(10), **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_batches_equal_cpu_batches():
    data = indexed_dataset(100)
    cpu = epoch(BatchIterator(data, 16, augment=True, seed=5))
    gpu = epoch(BatchIterator(data, 16, augment=True, seed=5, device="cuda"))
    assert gpu[0].device.type == "cuda"
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
