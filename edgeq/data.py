"""The user's data contract: `(inputs, labels)` arrays or tensors, or a `torch.utils.data.Dataset`
of `(input, label)` pairs, turned into float32 inputs `[N, ...]` and int64 labels `[N]`.

Inputs arrive already preprocessed, exactly as the model takes them; edgeq never changes them.
Every check runs before any training or writing, each failure one line naming the problem and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.errors import DataError


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
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
        raise DataError(f"{name}: labels are {y.dtype} with non-integer values; pass class indices")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"{name}: {int(bad.sum())} inputs hold NaN or Inf (first: sample {int(np.flatnonzero(bad)[0])}); "
                        "clean or drop them")
    x.setflags(write=False)
    y.setflags(write=False)
    return Arrays(x, y)


def _numpy(value: object, name: str, part: str) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise DataError(f"{name}: {part} cannot be read as an array ({exc}); pass numpy arrays or tensors") from None


def _from_dataset(ds: object, name: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    try:
        n = len(ds)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"{name}: the Dataset has no length; pass a map-style Dataset or (inputs, labels)") from None
    if n == 0:
        raise DataError(f"{name}: the data set is empty; pass at least one sample")
    xs, ys = [], []
    for i in range(n):
        item = ds[i]  # type: ignore[index]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"{name}: item {i} is not an (input, label) pair")
        x, y = item
        xs.append(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        ys.append(int(y.item()) if isinstance(y, torch.Tensor) else int(y))
    shapes = {a.shape for a in xs}
    if len(shapes) != 1:
        raise DataError(f"{name}: inputs have different shapes {sorted(map(list, shapes))[:3]}; pass one input shape")
    return np.stack(xs), np.asarray(ys)


def check_shapes(train: Arrays, test: Arrays) -> None:
    """Train and test inputs have one sample shape."""
    if train.sample_shape != test.sample_shape:
        raise DataError(f"train inputs are {list(train.sample_shape)} per sample but test inputs are "
                        f"{list(test.sample_shape)}; pass both splits in the shape the model takes")


def check_labels(train: Arrays, test: Arrays, classes: int) -> None:
    """Every label of both splits is a class of the model: in [0, classes)."""
    for arrays, name in ((train, "train"), (test, "test")):
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
    return [x[i : i + batch] for i in range(0, len(x), batch)]


def first_samples(batched: list[np.ndarray], samples: int) -> list[np.ndarray]:
    """The first `samples` samples of a list of batches, in their batches."""
    out, left = [], samples
    for batch in batched:
        if left <= 0:
            break
        out.append(batch[:left])
        left -= len(out[-1])
    return out
