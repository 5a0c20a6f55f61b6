"""CIFAR-10 (Krizhevsky 2009): downloaded once, checksum-verified, parsed, cached as arrays.

Files in the cache folder (`root`, else $NORMLAB_DATA, else ~/.cache/normlab):

    cifar-10-python.tar.gz       the official archive (md5 c58f30108f718f92721af3b95e74349a)
    cifar-10-<md5>.npz           the parsed uint8 arrays (N, 3, 32, 32), for fast reloads

The archive's python pickle batches (data_batch_1..5, test_batch: a dict with b"data", uint8
(n, 3072) rows of 1024 red, 1024 green, 1024 blue values in row-major 32x32 order, and b"labels")
are read with an unpickler that admits only the numpy array constructors they need. Images are
standardized per channel with the mean and std of all 50000 training images (also when
`limit_train` keeps fewer). Augmentation defaults: pad=4, flip=True.

Reliability: downloads go to a temporary file and are renamed into place only after the md5
matches. A cached archive with the wrong md5, or a cached npz that cannot be read, is reported
(warning) and fetched or parsed again; an archive that cannot be parsed, or parses into the wrong
shapes or labels, raises DataError naming the file. Nothing unverified is ever returned.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import re
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab.data.base import (
    ArrayDataset,
    DataError,
    cache_dir,
    register_dataset,
    register_dataset_check,
    standardized_pair,
)
from normlab.utils.config import ConfigError, check_interval

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
_FOLDER = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCHES = ("test_batch",)
_KEYS = ("train_x", "train_y", "test_x", "test_y")
TRAIN_IMAGES = 50000
REACH_TIMEOUT_S = 10.0  # the plan check's wait for the download address to answer


@register_dataset("cifar10")
def load_cifar10(root: str | os.PathLike | None = None, *, download: bool = True,
                 url: str = URL, md5: str = MD5, limit_train: int | None = None,
                 limit_test: int | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) CIFAR-10, (N, 3, 32, 32) standardized with training statistics.

    `download=False` never touches the network. `url` and `md5` name another copy of the
    archive (a mirror, or a test fixture). `limit_train` / `limit_test` keep the first examples
    of each split, for quick runs. First call: download (~170 MB), then md5 + parse (~2 s);
    later calls read the cached npz (~1 s).
    """
    _check_options(md5, limit_train, limit_test)
    arrays = cifar10_arrays(cache_dir(root), url=url, md5=md5, download=download)
    train_x = torch.from_numpy(arrays["train_x"])
    train = (train_x[:limit_train], torch.from_numpy(arrays["train_y"])[:limit_train])
    test = (torch.from_numpy(arrays["test_x"])[:limit_test],
            torch.from_numpy(arrays["test_y"])[:limit_test])
    return standardized_pair("cifar10", train, test, num_classes=10, pad=4, flip=True,
                             stats_from=train_x)


@register_dataset_check("cifar10")
def cifar10_train_size(root: str | os.PathLike | None = None, present: bool = True,
                       *, download: bool = True,
                       url: str = URL, md5: str = MD5, limit_train: int | None = None,
                       limit_test: int | None = None) -> int:
    """The training images `load_cifar10` would return, without loading them; with `present`,
    DataError when CIFAR-10 is neither cached (the parsed arrays, or an archive with the right
    md5) nor downloadable: `download=False`, or `url` does not answer within
    `REACH_TIMEOUT_S`. The runs then download it, the first one that needs it.

    Cost: a stat when cached; an md5 of the archive (~0.3 s) when only it is; one request
    (its headers, not the file) when nothing is.
    """
    _check_options(md5, limit_train, limit_test)
    folder = cache_dir(root)
    archive = folder / ARCHIVE
    if present and not ((folder / f"cifar-10-{md5}.npz").exists() or (
            archive.exists() and file_md5(archive) == md5)):
        if not download:
            raise DataError(f"CIFAR-10 is not in the cache {folder} and download=False. "
                            f"{_by_hand(url, archive, md5)}")
        reason = _unreachable(url)
        if reason:
            raise DataError(f"CIFAR-10 is not in the cache {folder}, and {url} cannot be "
                            f"reached to download it ({reason}). {_by_hand(url, archive, md5)}")
    return min(TRAIN_IMAGES, limit_train or TRAIN_IMAGES)


def _check_options(md5: str, limit_train: int | None, limit_test: int | None) -> None:
    if not (isinstance(md5, str) and re.fullmatch(r"[0-9a-f]{32}", md5)):
        raise ConfigError(f"The 'md5' setting must be 32 lowercase hex digits; got {md5!r}.")
    for setting, value in (("limit_train", limit_train), ("limit_test", limit_test)):
        if value is not None:
            check_interval(setting, value, 1, kind=int, low_open=False)


def _unreachable(url: str) -> str | None:
    """Why `url` cannot be opened now (its response headers read, the body left unread), or
    None when it can."""
    try:
        with urllib.request.urlopen(url, timeout=REACH_TIMEOUT_S):
            return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        return str(getattr(err, "reason", None) or err)


def cifar10_arrays(folder: Path, *, url: str = URL, md5: str = MD5,
                   download: bool = True) -> dict[str, np.ndarray]:
    """The raw uint8 arrays train_x (N, 3, 32, 32), train_y (N,), test_x, test_y.

    Read from the cached npz if it is sound; else from the archive (fetched if needed), then
    cached.
    """
    parsed = folder / f"cifar-10-{md5}.npz"
    if parsed.exists():
        try:
            return read_parsed(parsed)
        except DataError as err:
            warnings.warn(f"{err} Parsing the archive again.", stacklevel=2)
            parsed.unlink(missing_ok=True)
    archive = fetch_archive(folder, url=url, md5=md5, download=download)
    arrays = parse_archive(archive)
    _write_npz(parsed, arrays)
    return arrays


def fetch_archive(folder: Path, *, url: str = URL, md5: str = MD5,
                  download: bool = True) -> Path:
    """The path of a cached archive whose md5 matches, downloading it if it is missing or bad."""
    archive = folder / ARCHIVE
    problem = ""
    if archive.exists():
        actual = file_md5(archive)
        if actual == md5:
            return archive
        problem = (f"The CIFAR-10 archive {archive} has md5 {actual}, expected {md5}: it is "
                   "corrupt, truncated or a different file.")
        if not download:
            raise DataError(f"{problem} Delete it, or replace it with a good copy of {url}.")
        warnings.warn(f"{problem} Downloading it again.", stacklevel=3)
    elif not download:
        raise DataError(f"The CIFAR-10 archive is not in the cache and download=False. "
                        f"{_by_hand(url, archive, md5)}")
    _download(url, archive, md5, problem)
    return archive


def _by_hand(url: str, archive: Path, md5: str) -> str:
    return (f"To install it by hand, download {url} and put it at {archive} (md5 {md5}); "
            f"or pass root= / set NORMLAB_DATA to a folder that holds {ARCHIVE}.")


def _download(url: str, archive: Path, md5: str, problem: str) -> None:
    """Stream `url` to a temporary file beside `archive`, check its md5, then rename it."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{ARCHIVE}.", suffix=".part", dir=archive.parent)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                progress = _Progress(url, int(response.headers.get("Content-Length") or 0))
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.advance(len(chunk))
                progress.close()
                out.flush()
                os.fsync(out.fileno())
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise DataError(f"{problem + ' ' if problem else ''}Could not download CIFAR-10 "
                            f"from {url} ({reason}). {_by_hand(url, archive, md5)}") from err
        if digest.hexdigest() != md5:
            raise DataError(
                f"The file downloaded from {url} has md5 {digest.hexdigest()}, expected {md5}: "
                f"the download is corrupt or truncated, or the address serves another file. "
                f"Nothing was saved. {_by_hand(url, archive, md5)}")
        os.replace(tmp, archive)
    finally:
        Path(tmp).unlink(missing_ok=True)


class _Progress:
    """Download progress on stderr: a rewritten line on a terminal, a line per 10 % elsewhere."""

    def __init__(self, url: str, total: int) -> None:
        self.total, self.done, self.shown = total, 0, -1
        self.tty = sys.stderr.isatty()
        print(f"Downloading {url} ({total / 1e6:.1f} MB)", file=sys.stderr, flush=True)

    def advance(self, size: int) -> None:
        self.done += size
        if not self.total:
            return
        percent = 100 * self.done // self.total
        step = 1 if self.tty else 10
        if percent // step > self.shown:
            self.shown = percent // step
            end = "\r" if self.tty else "\n"
            print(f"  {self.done / 1e6:.1f} / {self.total / 1e6:.1f} MB ({percent}%)", end=end,
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def parse_archive(archive: Path) -> dict[str, np.ndarray]:
    """Read the six pickle batches of the archive into validated uint8 arrays (N, 3, 32, 32)."""
    try:
        # Decompress the whole stream first: gzip checks its CRC and length only at the end,
        # which reading just the members would never reach, so bit rot would pass unnoticed.
        with gzip.open(archive, "rb") as stream:
            tar_bytes = stream.read()  # ~180 MB for the official archive
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            batches = {name: _read_batch(tar, name, archive)
                       for name in _TRAIN_BATCHES + _TEST_BATCHES}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"The CIFAR-10 archive {archive} cannot be read ({err}): it is corrupt "
                        "or truncated. Delete it and load again.") from err
    train = [batches[name] for name in _TRAIN_BATCHES]
    test = [batches[name] for name in _TEST_BATCHES]
    arrays = {
        "train_x": np.concatenate([x for x, _ in train]).reshape(-1, 3, 32, 32),
        "train_y": np.concatenate([y for _, y in train]),
        "test_x": np.concatenate([x for x, _ in test]).reshape(-1, 3, 32, 32),
        "test_y": np.concatenate([y for _, y in test]),
    }
    _validate(arrays, archive)
    return arrays


def _read_batch(tar: tarfile.TarFile, name: str, archive: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: data uint8 (n, 3072) and labels int64 (n,), checked."""
    where = f"{archive} (member {_FOLDER}/{name})"
    try:
        handle = tar.extractfile(f"{_FOLDER}/{name}")
    except KeyError as err:
        raise DataError(f"The CIFAR-10 archive {archive} has no member {_FOLDER}/{name}.") from err
    if handle is None:
        raise DataError(f"{where} is not a regular file.")
    payload = handle.read()  # decompression errors propagate to parse_archive
    try:
        batch = _BatchUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as err:  # any unpickling failure means a corrupt member
        raise DataError(f"{where} is not a valid CIFAR-10 pickle batch ({err}).") from err
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072):
        shape = getattr(data, "shape", None)
        raise DataError(f"{where} must hold b'data' as uint8 (n, 3072); got {shape}.")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{where} has b'labels' that are not integers.") from err
    if labels.shape != (data.shape[0],):
        raise DataError(f"{where} has {labels.shape} labels for {data.shape[0]} images.")
    return data, labels


def _validate(arrays: dict[str, np.ndarray], source: Path) -> None:
    """Shapes, dtypes and label range of parsed arrays; DataError naming `source` otherwise."""
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        ok = (x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (3, 32, 32)
              and x.shape[0] > 0 and y.dtype == np.int64 and y.shape == (x.shape[0],))
        if not ok:
            raise DataError(
                f"{source}: the {split} split has images {x.dtype}{x.shape} and labels "
                f"{y.dtype}{y.shape}; expected uint8 (n, 3, 32, 32) and int64 (n,).")
        if y.min() < 0 or y.max() > 9:
            raise DataError(
                f"{source}: {split} labels must be in 0..9; found {y.min()}..{y.max()}.")


_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array-unpickling function, any version
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol 2
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings, numbers and numpy arrays: a CIFAR batch, no code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return _ALLOWED[(module, name)]


def read_parsed(path: Path) -> dict[str, np.ndarray]:
    """The cached arrays, checked; DataError naming `path` if unreadable (zip CRC) or wrong."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in _KEYS}
    except Exception as err:  # zip, CRC, header or missing-key errors all mean a bad cache file
        raise DataError(f"The cached CIFAR-10 arrays {path} are corrupt ({err}).") from err
    _validate(arrays, path)
    return arrays


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Save uncompressed (fast to read; the zip CRCs still catch corruption), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
