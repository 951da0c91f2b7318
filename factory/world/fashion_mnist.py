"""The real Fashion-MNIST garments, read from the idx files the Debian package installs.

Fashion-MNIST is 70,000 grey 28x28 photos of Zalando products in 10 classes (60,000 train, 10,000 test).
The files are tiny (about 30 MB decoded), so they are decoded once per process and cached; the cached
arrays are made read-only because every caller shares them.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np

from factory.errors import TokenFactoryError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "TOKENFACTORY_FASHION_MNIST"

FashionSplit = Literal["train", "test"]
_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# idx magic numbers: 0x08 = unsigned byte data, last byte = number of dimensions.
_MAGIC_IMAGES = 0x00000803
_MAGIC_LABELS = 0x00000801


class FashionMNISTMissing(TokenFactoryError, FileNotFoundError):
    """The Fashion-MNIST files are not where we looked; the message says how to install them."""

    http_status, code = 503, "dataset_missing"


def fashion_mnist_dir() -> Path:
    """Where the idx files are: ``$TOKENFACTORY_FASHION_MNIST`` if set, else the Debian package's folder."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: not an idx file of the expected kind (magic {found:#010x}, want {magic:#010x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated idx file ({arr.size} bytes of data for shape {shape})")
    return arr.reshape(shape)


@functools.lru_cache(maxsize=4)
def _load(split: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = _FILES[split]
    paths = [Path(folder) / images_name, Path(folder) / labels_name]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FashionMNISTMissing(
            f"Fashion-MNIST {split} files not found: {', '.join(missing)}. Install them with "
            "`sudo apt-get install dataset-fashion-mnist` (or `make setup`), or point "
            f"${ENV_VAR} at a folder holding the four *-ubyte.gz files of Fashion-MNIST."
        )
    images = _read_idx(paths[0], _MAGIC_IMAGES)
    labels = _read_idx(paths[1], _MAGIC_LABELS)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels.shape}")
    # frombuffer over bytes is already read-only; copy once so the arrays own contiguous memory, then
    # freeze them because the cache hands the same objects to every caller.
    images, labels = images.copy(), labels.copy()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist(split: FashionSplit = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N,28,28], labels uint8 [N])`` of one split; cached, read-only arrays.

    Labels are the class indices 0..9 in ``factory.world.attributes.CATEGORIES`` order.
    """
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    return _load(split, str(fashion_mnist_dir()))
