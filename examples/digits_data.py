"""Data for the digits examples: scikit-learn's 8x8 digits, or MNIST from IDX files.

Only NumPy is needed to import this module (scikit-learn is imported when the bundled
digits are loaded), so tests can use the IDX reader and writer on their own::

    import digits_data  # with examples/ on sys.path
    digits_data.write_fake_mnist(tmp_dir)  # small learnable IDX files, gzipped
    data = digits_data.load_dataset(tmp_dir, seed=0)

Both sources give the same :class:`Dataset`: float32 images flattened to ``[N, D]``
(``D = 64`` for the digits, ``784`` for MNIST), scaled to [0, 1] and then centred by the
training set's mean image, int32 labels in ``[0, 10)``, and train, validation and test
splits.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

NUM_CLASSES = 10

# The four MNIST files, as distributed by LeCun, Cortes and Burges (optionally .gz).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Fraction of the MNIST training file held out for validation (6,000 of 60,000).
MNIST_VAL_FRACTION = 0.1

# IDX type codes (third magic byte) and their big-endian NumPy dtypes.
_IDX_DTYPES = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"


class Split(NamedTuple):
    """One split: images ``x`` float32 ``[N, D]`` and labels ``y`` int32 ``[N]``."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits plus what is needed to draw an image."""

    name: str
    train: Split
    val: Split
    test: Split
    image_shape: tuple[int, int]
    mean_image: np.ndarray  # float32 [D]; add it back to a row of x to draw it

    @property
    def num_features(self) -> int:
        return self.train.x.shape[1]

    def image(self, split: Split, index: int) -> np.ndarray:
        """The ``index``-th image of ``split`` as ``image_shape`` pixels in [0, 1]."""
        return (split.x[index] + self.mean_image).reshape(self.image_shape)


# --- IDX files (numpy only) -------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (gzipped or raw, told apart by content) into a NumPy array.

    The format: two zero bytes, a type code, the number of dimensions ``n``, then ``n``
    big-endian uint32 sizes and the big-endian data in C order.

    Raises:
      ValueError: if the file is not IDX or its size disagrees with its header.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (its first bytes are {raw[:4].hex()}; IDX starts "
            f"with 0000 and a type code in {sorted(_IDX_DTYPES)})"
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header of {ndim} dimensions is truncated")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} of {dtype.name} ({expected} bytes "
            f"with the header) but the data has {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # native byte order, a writable copy


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Writes ``array`` as an IDX file, gzipped if ``path`` ends in ``.gz``."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    array = np.asarray(array)
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"write_idx: dtype {array.dtype} has no IDX type code")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + array.astype(_IDX_DTYPES[code]).tobytes()
    path.write_bytes(gzip.compress(raw, mtime=0) if path.suffix == ".gz" else raw)
    return path


def find_mnist_files(data_dir: str | Path) -> dict[str, Path]:
    """Locates the four MNIST files in ``data_dir``, each raw or ``.gz``.

    Also accepts the common ``train-images.idx3-ubyte`` spelling (a dot before
    ``idx``).

    Raises:
      FileNotFoundError: naming the directory or the files that are missing.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such directory")
    found, missing = {}, []
    for key, stem in MNIST_FILES.items():
        names = [stem, stem.replace("-idx", ".idx")]
        candidates = [data_dir / (n + ext) for n in names for ext in ("", ".gz")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(stem + "[.gz]")
        else:
            found[key] = path
    if missing:
        raise FileNotFoundError(
            f"{data_dir}: missing MNIST IDX file(s) {', '.join(missing)}"
        )
    return found


def load_mnist_arrays(data_dir: str | Path) -> dict[str, np.ndarray]:
    """The four MNIST arrays as stored: uint8 images ``[N, H, W]``, labels ``[N]``."""
    arrays = {key: read_idx(path) for key, path in find_mnist_files(data_dir).items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"MNIST {part}: images of shape {images.shape} and labels of shape "
                f"{labels.shape}; expected [N, H, W] and [N]"
            )
        if labels.size and not (0 <= labels.min() and labels.max() < NUM_CLASSES):
            raise ValueError(f"MNIST {part}: labels must be in [0, {NUM_CLASSES})")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ValueError("MNIST: train and test images have different sizes")
    return arrays


def write_fake_mnist(
    data_dir: str | Path,
    num_train: int = 1200,
    num_test: int = 200,
    seed: int = 0,
    compress: bool = True,
) -> dict[str, Path]:
    """Writes small MNIST-shaped IDX files (28x28 uint8) that a model can learn.

    An image of class ``k`` is faint noise plus a bright 6x6 square whose position
    encodes ``k``, so a correct parser (images aligned with their labels) lets one
    epoch reach high accuracy, while a wrong one leaves it near chance (0.1).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {}
    for part, n in (("train", num_train), ("test", num_test)):
        labels = rng.integers(0, NUM_CLASSES, n).astype(np.uint8)
        images = rng.integers(0, 64, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            row, col = 2 + 14 * (k // 5), 1 + 5 * (k % 5)
            images[i, row : row + 6, col : col + 6] = 255
        ext = ".gz" if compress else ""
        for kind, array in (("images", images), ("labels", labels)):
            key = f"{part}_{kind}"
            paths[key] = write_idx(data_dir / (MNIST_FILES[key] + ext), array)
    return paths


# --- datasets ---------------------------------------------------------------------------


def _centred(name, train, val, test, image_shape) -> Dataset:
    """Centres every split by the training set's mean image (the one data statistic)."""
    mean_image = train.x.mean(axis=0)
    return Dataset(
        name=name,
        train=Split(train.x - mean_image, train.y),
        val=Split(val.x - mean_image, val.y),
        test=Split(test.x - mean_image, test.y),
        image_shape=image_shape,
        mean_image=mean_image,
    )


def load_sklearn_digits(seed: int) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, split 60/20/20 (stratified by class).

    Bundled with scikit-learn, so nothing is downloaded.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixels are integers 0..16
    y = digits.target.astype(np.int32)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=seed, stratify=y
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
    )
    return _centred(
        "scikit-learn digits (8x8)",
        Split(x_train, y_train),
        Split(x_val, y_val),
        Split(x_test, y_test),
        image_shape=(8, 8),
    )


def load_mnist(data_dir: str | Path, seed: int) -> Dataset:
    """MNIST from IDX files; a seeded random 10% of the training file validates."""
    arrays = load_mnist_arrays(data_dir)
    image_shape = arrays["train_images"].shape[1:]

    def flat(images):
        return (images.reshape(len(images), -1) / 255.0).astype(np.float32)

    x, y = flat(arrays["train_images"]), arrays["train_labels"].astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, round(MNIST_VAL_FRACTION * len(x)))
    val, train = order[:n_val], order[n_val:]
    return _centred(
        f"MNIST IDX files in {data_dir} ({image_shape[0]}x{image_shape[1]})",
        Split(x[train], y[train]),
        Split(x[val], y[val]),
        Split(flat(arrays["test_images"]), arrays["test_labels"].astype(np.int32)),
        image_shape=image_shape,
    )


def load_dataset(data_dir: str | Path | None, seed: int) -> Dataset:
    """MNIST from ``data_dir`` if given, else scikit-learn's bundled digits."""
    return load_sklearn_digits(seed) if data_dir is None else load_mnist(data_dir, seed)
