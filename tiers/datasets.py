"""Datasets that `tierflow send` (and the tests) can send without a network: name -> numpy arrays.

Called by tiers/send_cli.py and by tests that need real images. `load(name)` returns a `Dataset`
with all samples in `x` and their labels in `y` (a dataset's own train/test split, when it has one, is
concatenated, train first: the training job splits by the datasource's validation/test rates after
shuffling, so the sender does not need to). Names:

- `fashion-mnist`: 70,000 uint8 28x28 images from the Debian package `dataset-fashion-mnist`
  (`apt-get install dataset-fashion-mnist`; gzipped IDX files in /usr/share/datasets/fashion-mnist).
- `digits`: scikit-learn's 1,797 handwritten digits (shipped inside its wheel), resized from 8x8 to
  28x28 and scaled to float32 in [0, 1], the input the Kafka-ML example models take (on the raw 0..16
  8x8 values those models barely learn). `digits-8x8`: the original 8x8 images, uint8 0..16.
- `npz:PATH`: a numpy .npz with arrays `x`/`y`, or `x_train`/`y_train` (+ `x_test`/`y_test`).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierflow.streams.errors import PermanentError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("fashion-mnist", "digits", "digits-8x8", "npz:PATH")

# IDX element type codes (the MNIST file format) -> numpy dtypes (big-endian on disk).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(PermanentError, ValueError):
    """A dataset that cannot be loaded; the message says how to get it (retrying without that cannot help)."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x: np.ndarray[Any, Any]
    y: np.ndarray[Any, Any]
    description: str

    def __len__(self) -> int:
        return len(self.x)

    def head(self, limit: int | None) -> Dataset:
        """The first `limit` samples (all when None)."""
        if limit is None or limit >= len(self.x):
            return self
        return Dataset(self.name, self.x[:limit], self.y[:limit], self.description)


def read_idx(path: Path) -> np.ndarray[Any, Any]:
    """One IDX file (optionally gzipped): magic (0, 0, type, ndim), ndim big-endian sizes, then the data."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data: bytes = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DatasetError(f"{path} is not an IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path}: {len(data) - header} bytes of data, the header announces {expected}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST from the Debian package's files (train then test: 70,000 uint8 28x28 images)."""
    parts = []
    for split in ("train", "t10k"):
        images, labels = root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz"
        if not images.exists() or not labels.exists():
            raise DatasetError(f"Fashion-MNIST is not installed ({images} is missing): "
                               "apt-get install dataset-fashion-mnist, or use --dataset digits")
        x, y = read_idx(images), read_idx(labels)
        if len(x) != len(y):
            raise DatasetError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
        parts.append((x, y))
    x = np.concatenate([p[0] for p in parts]).astype(np.uint8, copy=False)
    y = np.concatenate([p[1] for p in parts]).astype(np.uint8, copy=False)
    return Dataset("fashion-mnist", x, y, "Fashion-MNIST (Zalando), 28x28 uint8, 10 classes")


def resize_images(x: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    """Bilinear resize of (n, h, w) images to (n, size, size), float32 (pixel centres aligned)."""
    _, h, w = x.shape
    src = x.astype(np.float32, copy=False)

    def axis(out: int, inp: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        pos = np.clip((np.arange(out, dtype=np.float32) + 0.5) * (inp / out) - 0.5, 0, inp - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, inp - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    r0, r1, rw = axis(size, h)
    c0, c1, cw = axis(size, w)
    rows = src[:, r0, :] * (1 - rw)[None, :, None] + src[:, r1, :] * rw[None, :, None]
    out: np.ndarray[Any, Any] = rows[:, :, c0] * (1 - cw)[None, None, :] + rows[:, :, c1] * cw[None, None, :]
    return out.astype(np.float32, copy=False)


def load_digits(size: int | None = 28) -> Dataset:
    """scikit-learn's digits: resized to size x size float32 in [0, 1], or the 8x8 uint8 originals (size=None)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DatasetError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = sk_digits()
    images = np.asarray(bunch.images)  # (1797, 8, 8) float64 in 0..16
    y = np.asarray(bunch.target).astype(np.uint8)
    if size is None:
        return Dataset("digits-8x8", images.astype(np.uint8), y, "scikit-learn digits, 8x8 uint8 (0..16), 10 classes")
    x = np.clip(resize_images(images, size) / 16.0, 0.0, 1.0).astype(np.float32)
    return Dataset("digits", x, y, f"scikit-learn digits, {size}x{size} float32 in [0, 1], 10 classes")


def load_npz(path: Path) -> Dataset:
    """Arrays x/y, or x_train/y_train (+ x_test/y_test, appended), from a numpy .npz file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path} as a numpy .npz file: {exc}") from None
    if "x" in arrays and "y" in arrays:
        x, y = arrays["x"], arrays["y"]
    elif "x_train" in arrays and "y_train" in arrays:
        xs, ys = [arrays["x_train"]], [arrays["y_train"]]
        if "x_test" in arrays and "y_test" in arrays:
            xs.append(arrays["x_test"])
            ys.append(arrays["y_test"])
        x, y = np.concatenate(xs), np.concatenate(ys)
    else:
        raise DatasetError(f"{path} has arrays {sorted(arrays)}; expected x and y, or x_train and y_train")
    if len(x) != len(y):
        raise DatasetError(f"{path}: {len(x)} samples but {len(y)} labels")
    return Dataset(f"npz:{path.name}", x, y, f"{path.name}: {len(x)} samples of shape {x.shape[1:]}")


def load(name: str, *, fashion_mnist_dir: Path = FASHION_MNIST_DIR) -> Dataset:
    """The dataset called `name` (see the module docstring for the names)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(fashion_mnist_dir)
    if name == "digits":
        return load_digits(28)
    if name == "digits-8x8":
        return load_digits(None)
    if name.startswith("npz:"):
        path = Path(name[4:]).expanduser()
        if not name[4:]:
            raise DatasetError("npz: needs a path, e.g. npz:data/mnist.npz")
        return load_npz(path)
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")


def slug(name: str) -> str:
    """A topic-friendly name for a dataset name (npz:/a/b/set.npz -> set)."""
    base = Path(name[4:]).stem if name.startswith("npz:") else name
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in base).strip("-.")
    return cleaned or "dataset"
