"""The user's data contract: `(inputs, labels)` arrays or tensors, or a `torch.utils.data.Dataset`
of `(input, label)` pairs, turned into float32 inputs `[N, ...]` and int64 labels `[N]`.

Inputs arrive already preprocessed, exactly as the model takes them; edgeq never changes them.
Every check runs before any training or writing, each failure one line naming the problem and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.errors import DataError, first_line


@dataclass(frozen=True)
class Arrays:
    """Inputs float32 [N, ...] and labels int64 [N], read-only."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])


def as_arrays(data: object, name: str) -> Arrays:
    """`(inputs, labels)` (numpy or torch) or a Dataset of `(input, label)` -> checked Arrays."""
    import torch

    if isinstance(data, torch.utils.data.Dataset):
        x, y = _from_dataset(data, name)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (_numpy(v, name, part) for v, part in zip(data, ("inputs", "labels")))
    else:
        raise DataError(f"{name}: expected a pair (inputs, labels) of arrays or tensors, or a torch Dataset of "
                        f"(input, label); got {type(data).__name__}")
    if x.ndim < 2:
        raise DataError(f"{name}: inputs have shape {list(x.shape)}; expected [N, ...] with one sample per row")
    if len(x) == 0:
        raise DataError(f"{name}: the data set is empty; pass at least one sample")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{name}: {len(x)} inputs but labels of shape {list(y.shape)}; pass one integer label per input")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{name}: inputs are {x.dtype}; pass float inputs, preprocessed exactly as the model takes them")
    y = _check_labels(y, name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"{name}: {int(bad.sum())} inputs hold NaN or Inf (first: sample {int(np.flatnonzero(bad)[0])}); "
                        "clean or drop them")
    check_magnitudes(x, name)
    x.setflags(write=False)
    y.setflags(write=False)
    return Arrays(x, y)


# Input magnitudes edgeq refuses, before any work. Beyond MAX_ABS_INPUT a value's square overflows float32
# (sums of squares, variances, the logits' SQNR and the calibrators' histogram ranges become infinite:
# onnxruntime's Entropy calibrator fails on a 3e38 value). A sample whose largest |value| is OUTLIER_FACTOR
# times the typical sample's (the median of every sample's largest |value|) is a corrupt value, not data:
# it alone would set every int8 activation range (a 1e15 among values near 1 leaves no int8 step for the
# rest, and breaks torch's int8 kernels).
MAX_ABS_INPUT = float(np.sqrt(np.finfo(np.float32).max))  # 1.8e19
OUTLIER_FACTOR = 1e6
_CHUNK = 4096  # samples per piece when scanning inputs, so that no copy of a whole split is made


def check_magnitudes(x: np.ndarray, name: str) -> None:
    """Refuse inputs beyond MAX_ABS_INPUT, or a sample OUTLIER_FACTOR times larger than the typical one."""
    peaks = np.concatenate([np.abs(x[i : i + _CHUNK].reshape(len(x[i : i + _CHUNK]), -1)).max(axis=1)
                            for i in range(0, len(x), _CHUNK)]).astype(np.float64)
    worst = int(peaks.argmax())
    value = float(x[worst].reshape(-1)[np.abs(x[worst].reshape(-1)).argmax()])
    if peaks[worst] >= MAX_ABS_INPUT:
        raise DataError(f"{name}: sample {worst} holds {value:.3g}; inputs beyond +-{MAX_ABS_INPUT:.2g} overflow "
                        "float32 once squared (calibration ranges, variances and accuracy checks become infinite): "
                        "scale the inputs as the model is meant to take them, or drop the sample")
    nonzero = peaks[peaks > 0]
    typical = float(np.median(nonzero)) if len(nonzero) else 0.0
    if typical > 0 and peaks[worst] > OUTLIER_FACTOR * typical:
        raise DataError(f"{name}: sample {worst} holds {value:.3g}, {peaks[worst] / typical:.2g} times the largest "
                        f"value of a typical sample ({typical:.3g}); one such value would set every int8 range and "
                        f"leave no int8 step for the rest (limit: {OUTLIER_FACTOR:g} times): clean, clip or drop it")


def _numpy(value: object, name: str, part: str) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise DataError(f"{name}: {part} cannot be read as an array ({exc}); pass numpy arrays or tensors") from None


def _from_dataset(ds: object, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        n = len(ds)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"{name}: the Dataset has no length; pass a map-style Dataset or (inputs, labels)") from None
    if n == 0:
        raise DataError(f"{name}: the data set is empty; pass at least one sample")
    xs, ys = [], []
    for i in range(n):
        x, y = _item(ds, i, n, name)
        xs.append(x)
        ys.append(y)
    shapes = {a.shape for a in xs}
    if len(shapes) != 1:
        raise DataError(f"{name}: inputs have different shapes {sorted(map(list, shapes))[:3]}; pass one input shape")
    return np.stack(xs), np.asarray(ys)


def _item(ds: object, i: int, n: int, name: str) -> tuple[np.ndarray, int]:
    """Item i of a Dataset as (input array, integer label); what its __getitem__ raises becomes one line."""
    import torch

    try:
        item = ds[i]  # type: ignore[index]
    except IndexError as exc:
        raise DataError(f"{name}: the Dataset says len() = {n} but item {i} raised IndexError ({first_line(exc)}); "
                        "make __len__ return the number of items __getitem__ serves") from None
    except Exception as exc:
        raise DataError(f"{name}: the Dataset's item {i} raised {type(exc).__name__}: {first_line(exc)}") from None
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"{name}: item {i} is not an (input, label) pair")
    x, y = item
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if y.size != 1 or not (_integral(y) or y.dtype == np.bool_):
        raise DataError(f"{name}: item {i} has label {_show(y)} ({y.dtype}); labels are class indices: "
                        "integers 0..classes-1 (map names to indices first)")
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)), int(y.reshape(()))


def _integral(y: np.ndarray) -> bool:
    """Integer values: an integer dtype, or floats that are whole numbers."""
    if np.issubdtype(y.dtype, np.integer):
        return True
    return bool(np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)))


def _show(y: np.ndarray) -> str:
    text = repr(y.reshape(-1)[0].item()) if y.size else "[]"
    return text if len(text) <= 40 else text[:37] + "..."


def _check_labels(y: np.ndarray, name: str) -> np.ndarray:
    """Integer class indices as int64; bool labels are classes 0 and 1."""
    if y.dtype == np.bool_:
        return y.astype(np.int64)
    if _integral(y):
        return y
    if y.dtype.kind in "USO":
        raise DataError(f"{name}: labels are {'strings' if y.dtype.kind in 'US' else 'Python objects'} "
                        f"(first: {_show(y)}); pass class indices: integers 0..classes-1 (map names to indices first)")
    raise DataError(f"{name}: labels are {y.dtype} with non-integer values (first: "
                    f"{_show(y[y != np.round(y)] if y.dtype.kind in 'fc' else y)}); pass class indices")


def check_shapes(train: Arrays, other: Arrays, name: str = "test") -> None:
    """Train and another split (`name`: val or test) have one sample shape."""
    if train.sample_shape != other.sample_shape:
        raise DataError(f"train inputs are {list(train.sample_shape)} per sample but {name} inputs are "
                        f"{list(other.sample_shape)}; pass both splits in the shape the model takes")


def check_labels(train: Arrays, other: Arrays, classes: int, other_name: str = "test") -> None:
    """Every label of train and of another split (`other_name`: val or test) is a class of the model: in [0, classes)."""
    for arrays, name in ((train, "train"), (other, other_name)):
        low, high = int(arrays.y.min()), int(arrays.y.max())
        if low < 0 or high >= classes:
            raise DataError(f"{name} labels range over [{low}, {high}] but the model has {classes} classes; "
                            f"labels must lie in [0, {classes})")


def sample(arrays: Arrays, count: int, seed: int) -> np.ndarray:
    """A fixed, seeded sample of inputs (sorted indices), e.g. for calibration."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(arrays), size=min(count, len(arrays)), replace=False)
    return arrays.x[np.sort(idx)]


def batches(x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """`x` in batches of one size: the largest that divides len(x) and is at most `batch`.

    onnxruntime's Entropy and Percentile calibrators stack the outputs of every batch into one array,
    so batches of unequal size (100 samples as 64 + 36) break them. Every sample is used, in order,
    and a multiple of `batch` is cut exactly as before.
    """
    n = len(x)
    size = next(d for d in range(min(batch, n), 0, -1) if n % d == 0) if n else 1
    return [x[i : i + size] for i in range(0, n, size)]


def first_samples(batched: list[np.ndarray], samples: int) -> list[np.ndarray]:
    """The first `samples` samples of a list of batches, again in batches of one size (see `batches`)."""
    if not batched:
        return []
    x = np.concatenate(batched)[: max(samples, 0)]
    return batches(x, len(batched[0])) if len(x) else []


def holdout(train: Arrays, fraction: float, seed: int) -> tuple[Arrays, Arrays]:
    """(train, val): a stratified, seeded `fraction` of each class of `train` held out as the validation
    split every accuracy decision is made on; the rest stays for calibration, fine-tunes and QAT.
    A class with a single sample stays in train."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(train.y):
        idx = np.flatnonzero(train.y == label)
        take = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        held.append(rng.permutation(idx)[: min(max(take, 1 if len(idx) > 1 else 0), len(idx) - 1)])
    val_idx = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    if len(val_idx) == 0 or len(val_idx) == len(train):
        raise DataError(f"train: {len(train)} samples cannot be split into train and validation data; pass `val` "
                        "explicitly, or more training samples")
    keep = np.setdiff1d(np.arange(len(train)), val_idx)
    return _subset(train, keep), _subset(train, val_idx)


def _subset(arrays: Arrays, idx: np.ndarray) -> Arrays:
    x, y = np.ascontiguousarray(arrays.x[idx]), np.ascontiguousarray(arrays.y[idx])
    x.setflags(write=False)
    y.setflags(write=False)
    return Arrays(x, y)


def shared_samples(a: Arrays, b: Arrays) -> int:
    """How many samples of `a` (input and label) also appear in `b`: a validation split that shares
    samples with the test split makes the test accuracy no longer an independent estimate."""
    import hashlib

    def keys(arrays: Arrays) -> list[bytes]:
        return [hashlib.sha256(arrays.x[i].tobytes() + arrays.y[i].tobytes()).digest() for i in range(len(arrays))]

    seen = set(keys(b))
    return sum(k in seen for k in keys(a))
