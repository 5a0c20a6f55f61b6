"""CIFAR-10 download, checksum, parsing and caching, on tiny archives in the genuine format.

The official batches are Python 2 cPickle files; `py2_pickle` writes exactly those opcodes
(str keys, numpy.core.multiarray._reconstruct), so the parser is tested on the real format.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.data import DataError, load
from normlab.data.cifar10 import ARCHIVE, MD5, URL
from normlab.utils.config import ConfigError

N_PER_TRAIN_BATCH, N_TEST = 4, 6
LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
               b"ship", b"truck"]


def _str(value: bytes) -> bytes:
    if len(value) < 256:
        return b"U" + bytes([len(value)]) + value  # SHORT_BINSTRING
    return b"T" + struct.pack("<i", len(value)) + value  # BINSTRING


def _int(value: int) -> bytes:
    return b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value)


def _uint8_array(array: np.ndarray) -> bytes:
    dtype_state = b"(" + _int(3) + _str(b"|") + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb"
    dtype = b"cnumpy\ndtype\n" + _str(b"u1") + _int(0) + _int(1) + b"\x87R" + dtype_state
    shape = b"(" + b"".join(_int(s) for s in array.shape) + b"t"
    state = b"(" + _int(1) + shape + dtype + b"\x89" + _str(array.tobytes()) + b"tb"
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _int(0)
            + b"\x85" + _str(b"b") + b"\x87R" + state)


def _value(value: object) -> bytes:
    if isinstance(value, bytes):
        return _str(value)
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, list):
        return b"](" + b"".join(_value(v) for v in value) + b"e"
    assert isinstance(value, np.ndarray) and value.dtype == np.uint8
    return _uint8_array(value)


def py2_pickle(batch: dict[bytes, object]) -> bytes:
    """The bytes Python 2's cPickle (protocol 2) writes for a CIFAR-10 batch dict."""
    return b"\x80\x02}(" + b"".join(_str(k) + _value(v) for k, v in batch.items()) + b"u."


def write_archive(path: Path, seed: int = 0, labels_shift: int = 0) -> dict[str, np.ndarray]:
    """A tiny archive in the official layout; returns the rows and labels it holds."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    content: dict[str, np.ndarray] = {}
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for name in names:
            n = N_TEST if name == "test_batch" else N_PER_TRAIN_BATCH
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = (rng.integers(0, 10, n) + labels_shift).tolist()
            content[name + "_data"], content[name + "_labels"] = data, np.array(labels)
            add(name, py2_pickle({b"batch_label": name.encode(), b"labels": labels,
                                  b"data": data, b"filenames": [b"x.png"] * n}))
        add("batches.meta", py2_pickle({b"label_names": LABEL_NAMES,
                                        b"num_cases_per_batch": N_PER_TRAIN_BATCH,
                                        b"num_vis": 3072}))
    return content


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A good tiny archive outside the cache, and what it holds."""
    path = tmp_path / "mirror" / ARCHIVE
    path.parent.mkdir()
    return path, write_archive(path)


def load_from(path: Path, cache: Path, **options):
    options.setdefault("md5", md5(path))
    return load("cifar10", root=cache, url=path.as_uri(), **options)


def raw_images(rows: np.ndarray) -> np.ndarray:
    """Brute-force layout: pixel (c, r, w) of an image is row[c * 1024 + r * 32 + w]."""
    images = np.empty((len(rows), 3, 32, 32), dtype=np.float64)
    for c in range(3):
        for r in range(32):
            images[:, c, r, :] = rows[:, c * 1024 + r * 32:c * 1024 + r * 32 + 32]
    return images


def unstandardize(data) -> np.ndarray:
    mean, std = np.array(data.mean)[:, None, None], np.array(data.std)[:, None, None]
    return data.x.double().numpy() * std + mean


def test_official_address_and_checksum():
    assert URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert MD5 == "c58f30108f718f92721af3b95e74349a"


def test_parses_the_genuine_format_and_standardizes_with_training_statistics(source, tmp_path,
                                                                             capsys):
    path, content = source
    train, test = load_from(path, tmp_path / "cache")
    assert "Downloading" in capsys.readouterr().err
    train_rows = np.concatenate([content[f"data_batch_{i}_data"] for i in range(1, 6)])
    train_labels = np.concatenate([content[f"data_batch_{i}_labels"] for i in range(1, 6)])
    expected_train = raw_images(train_rows)
    assert train.x.shape == (5 * N_PER_TRAIN_BATCH, 3, 32, 32)
    assert test.x.shape == (N_TEST, 3, 32, 32)
    np.testing.assert_allclose(unstandardize(train), expected_train, atol=1e-3)
    np.testing.assert_allclose(unstandardize(test), raw_images(content["test_batch_data"]),
                               atol=1e-3)
    assert train.y.tolist() == train_labels.tolist()
    assert test.y.tolist() == content["test_batch_labels"].tolist()
    np.testing.assert_allclose(train.mean, expected_train.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(train.std, expected_train.std(axis=(0, 2, 3)), rtol=1e-9)
    assert test.mean == train.mean and test.std == train.std
    assert np.abs(test.x.double().mean(dim=(0, 2, 3)).numpy()).min() > 1e-4
    assert (train.pad, train.flip, train.num_classes) == (4, True, 10)
    assert (tmp_path / "cache" / ARCHIVE).read_bytes() == path.read_bytes()


def test_second_load_reads_the_cached_arrays(source, tmp_path):
    path, _ = source
    first, _ = load_from(path, tmp_path / "cache")
    checksum = md5(path)
    path.unlink()
    (tmp_path / "cache" / ARCHIVE).unlink()  # only the parsed npz is left
    again, _ = load("cifar10", root=tmp_path / "cache", md5=checksum, download=False)
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)


def test_corrupt_cached_arrays_are_reported_and_parsed_again(source, tmp_path):
    path, _ = source
    first, _ = load_from(path, tmp_path / "cache")
    (npz,) = (tmp_path / "cache").glob("cifar-10-*.npz")
    blob = bytearray(npz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    npz.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match=f"{npz}.*corrupt"):
        again, _ = load_from(path, tmp_path / "cache", download=False)
    assert torch.equal(first.x, again.x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_from(path, tmp_path / "cache", download=False)  # the rewritten cache is sound


def flipped_copy(path: Path, target: Path) -> Path:
    blob = bytearray(path.read_bytes())
    for i in range(len(blob) // 3, len(blob) // 3 + 8):
        blob[i] ^= 0xFF
    target.write_bytes(bytes(blob))
    return target


def truncated_copy(path: Path, target: Path) -> Path:
    target.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return target


@pytest.mark.parametrize("damage", [flipped_copy, truncated_copy])
def test_damaged_download_is_refused_and_nothing_is_saved(source, tmp_path, damage):
    path, _ = source
    bad = damage(path, tmp_path / "damaged.tar.gz")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=f"{bad.as_uri()}.*md5 {md5(bad)}, expected {md5(path)}"):
        load("cifar10", root=cache, url=bad.as_uri(), md5=md5(path))
    assert list(cache.iterdir()) == []  # no archive, no temporary file


@pytest.mark.parametrize("damage", [flipped_copy, truncated_copy])
def test_damaged_cached_archive_is_refused_offline(source, tmp_path, damage):
    path, _ = source
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = damage(path, cache / ARCHIVE)
    with pytest.raises(DataError, match=f"{bad}.*md5 {md5(bad)}, expected {md5(path)}"):
        load_from(path, cache, download=False)


def test_damaged_cached_archive_is_reported_and_fetched_again(source, tmp_path):
    path, _ = source
    cache = tmp_path / "cache"
    cache.mkdir()
    flipped_copy(path, cache / ARCHIVE)
    with pytest.warns(UserWarning, match=f"{cache / ARCHIVE} has md5"):
        train, _ = load_from(path, cache)
    assert len(train) == 5 * N_PER_TRAIN_BATCH
    assert md5(cache / ARCHIVE) == md5(path)


def test_wrong_checksum_is_refused(source, tmp_path):
    path, _ = source
    with pytest.raises(DataError, match="expected 0123456789abcdef0123456789abcdef"):
        load_from(path, tmp_path / "cache", md5="0123456789abcdef0123456789abcdef")


@pytest.mark.parametrize("damage", [flipped_copy, truncated_copy])
def test_damaged_archive_is_never_parsed_into_garbage(source, tmp_path, damage):
    """Even when the checksum is told to match, a damaged archive raises, naming the file."""
    path, _ = source
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = damage(path, cache / ARCHIVE)
    with pytest.raises(DataError, match=f"{bad}.*(corrupt|not a valid)"):
        load("cifar10", root=cache, md5=md5(bad), download=False)
    assert not list(cache.glob("*.npz"))


def test_wrong_contents_are_refused(tmp_path):
    path = tmp_path / ARCHIVE
    write_archive(path, labels_shift=5)  # labels up to 14
    with pytest.raises(DataError, match=f"{path}.*labels must be in 0..9"):
        load("cifar10", root=tmp_path, md5=md5(path), download=False)
    with tarfile.open(path, "w:gz") as tar:  # a well-formed archive without the batches
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match=f"{path} has no member cifar-10-batches-py/data_batch_1"):
        load("cifar10", root=tmp_path, md5=md5(path), download=False)


def test_pickles_that_run_code_are_refused(tmp_path):
    path = tmp_path / ARCHIVE
    payload = b"\x80\x02cos\nsystem\nU\x04trueK\x01\x85R."  # os.system("true")
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match=r"refusing to load os\.system"):
        load("cifar10", root=tmp_path, md5=md5(path), download=False)


def test_offline_message_says_where_to_put_the_archive(tmp_path):
    cache = tmp_path / "cache"
    unreachable = "http://127.0.0.1:9/cifar-10-python.tar.gz"
    with pytest.raises(DataError) as error:
        load("cifar10", root=cache, url=unreachable)
    message = str(error.value)
    assert f"put it at {cache / ARCHIVE} (md5 {MD5})" in message and unreachable in message
    with pytest.raises(DataError, match=f"put it at {cache / ARCHIVE}"):
        load("cifar10", root=cache, download=False)


def test_cache_folder_comes_from_normlab_data(source, tmp_path, monkeypatch):
    path, _ = source
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "env"))
    load("cifar10", url=path.as_uri(), md5=md5(path))
    assert (tmp_path / "env" / ARCHIVE).exists()


def test_limits_keep_the_first_examples_and_the_full_statistics(source, tmp_path):
    path, _ = source
    full_train, full_test = load_from(path, tmp_path / "cache")
    train, test = load_from(path, tmp_path / "cache", limit_train=3, limit_test=2)
    assert torch.equal(train.x, full_train.x[:3]) and torch.equal(test.y, full_test.y[:2])
    assert train.mean == full_train.mean


@pytest.mark.parametrize(("options", "setting"), [
    ({"limit_train": 0}, "limit_train"),
    ({"limit_test": 1.5}, "limit_test"),
    ({"md5": "not-a-checksum"}, "md5"),
])
def test_bad_options_are_refused(tmp_path, options, setting):
    with pytest.raises(ConfigError, match=repr(setting)):
        load("cifar10", root=tmp_path, download=False, **options)
