"""Fashion-MNIST (Xiao et al., 2017) from its idx files, as Debian's ``dataset-fashion-mnist`` installs them.

    images, labels = load_fashion_mnist("train")   # uint8 (60000, 28, 28), int64 (60000,)

The folder is, in order: the ``root`` argument, ``$RB_FASHION_MNIST``, ``/usr/share/datasets/fashion-mnist``.
Files may be gzipped (``train-images-idx3-ubyte.gz``) or not.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "RB_FASHION_MNIST"
_PREFIX = {"train": "train", "test": "t10k"}
# idx magic: 0x00 0x00, a type code (0x08 = unsigned byte), the number of dimensions.
_UBYTE = 0x08


class FashionMNISTNotFoundError(FileNotFoundError):
    """The idx files are not where we looked; the message says how to install them."""


class IdxFormatError(ValueError):
    """A file is not a valid idx file (bad magic, type, dimensions or size); the message names it."""


def fashion_mnist_root(root: Union[str, os.PathLike, None] = None) -> Path:
    """The folder holding the idx files (see the module docstring for the search order)."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FashionMNISTNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}. Install Debian's package "
        "(sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist, files land in "
        f"{DEFAULT_ROOT}), or point ${ENV_VAR} / --data-dir at a folder holding the four idx files."
    )


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an unsigned-byte idx file (optionally gzipped) into an array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise IdxFormatError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{path}: not an idx file (magic bytes {data[:4].hex() or 'missing'})")
    if data[2] != _UBYTE:
        raise IdxFormatError(f"{path}: idx type code 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise IdxFormatError(f"{path}: truncated header ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise IdxFormatError(f"{path}: {len(data)} bytes, but the header's shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str = "train", root: Union[str, os.PathLike, None] = None,
                       limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 (N, 28, 28)`` and labels ``int64 (N,)`` of ``split`` (``"train"`` or ``"test"``).

    ``limit`` keeps the first ``limit`` items (a quick run).
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_root(root)
    img_path = _find(folder, f"{_PREFIX[split]}-images-idx3-ubyte")
    lbl_path = _find(folder, f"{_PREFIX[split]}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise IdxFormatError(
            f"{folder}: images {img_path.name} have shape {images.shape} and labels {lbl_path.name} "
            f"{labels.shape}; expected (N, H, W) and (N,) with the same N"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise IdxFormatError(f"{lbl_path}: label {int(labels.max())} outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def write_idx(path: Union[str, os.PathLike], array: np.ndarray) -> Path:
    """Write a uint8 array as an idx file (gzipped when ``path`` ends in ``.gz``); for tests and subsets."""
    path, array = Path(path), np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def write_fake_fashion_mnist(folder: Union[str, os.PathLike], n_train: int = 64, n_test: int = 32,
                             seed: int = 0) -> Path:
    """Write a small, learnable stand-in in the real file layout (class k = a bright bar at row 2k+4)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % len(FASHION_MNIST_CLASSES)
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k + 4: 2 * k + 6, 4:24] = 255
        write_idx(folder / f"{_PREFIX[split]}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{_PREFIX[split]}-labels-idx1-ubyte.gz", labels)
    return folder
