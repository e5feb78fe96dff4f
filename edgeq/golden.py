"""Golden outputs: a few inputs from the evaluation data and every artifact's own outputs on them,
stored beside the manifest, so that a device can tell "arrived intact and computes what it computed
at export" from "loads and prints something".

Layout (onnxruntime's test-directory naming, one shared input):

    golden/input_0.pb               the inputs, a TensorProto named after the model's input
    golden/<artifact>/output_0.pb   that artifact's outputs on them, a TensorProto

Why TensorProto `.pb` files: they are what onnxruntime's `onnx_test_runner` (C++, no Python) reads
from a `test_data_set_0/` folder, what `onnx.numpy_helper` reads in Python, and any protobuf library
parses them from `onnx.proto`. They carry name, dtype and shape with the bytes; `.npy` needs numpy.

This module imports only numpy and the standard library: a device has numpy and onnxruntime, not
onnx. A TensorProto of raw data is four protobuf fields (dims, data_type, name, raw_data), so it is
written and read here by hand; the bytes are exactly those of `onnx.numpy_helper.from_array(...)
.SerializeToString()` (a test compares them), and the reader also takes the typed `float_data` /
`int64_data` / `int32_data` fields other writers use.

The tolerances a device must meet are set from measurement (docs/device.md, which gives the
command that regenerates them): threads 1 vs 2, onnxruntime's graph optimization levels, and
onnxruntime's aarch64 build on four emulated ARM CPUs (cortex-a72, neoverse-n1, max with and
without SVE).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeq import bundle, policy
from edgeq.errors import IntegrityError
from edgeq.manifest import sha256_file  # noqa: F401 (torch-free; tests and tools hash golden files with it)

FOLDER = "golden"
INPUT_FILE = "input_0.pb"
OUTPUT_FILE = "output_0.pb"
SAMPLES = 64  # inputs taken from the front of the evaluation data
FORMAT = "onnx TensorProto (.pb), onnxruntime test-directory naming"


@dataclass(frozen=True)
class Tolerance:
    """What a device's outputs must meet against an artifact's golden outputs.

    - logit error: max |output - golden| over all logits, divided by max |golden| of that artifact
      (scale-free, so one figure serves models whose logits differ in scale);
    - top-1 agreement: the fraction of samples whose top-1 class is the golden one, counted only on
      samples whose golden top-1 margin exceeds twice the allowed logit error (a closer pair can
      swap within the logit tolerance, which the logit check already bounds).
    """

    max_logit_error: float
    min_top1_agreement: float


# The values are edgeq.policy's (the one rule book); docs/device.md shows how they were measured.
TOLERANCES: dict[str, Tolerance] = {p: Tolerance(max_logit_error=e, min_top1_agreement=policy.GOLDEN_MIN_TOP1_AGREEMENT)
                                    for p, e in policy.GOLDEN_MAX_LOGIT_ERROR.items()}
SET_FROM = ("measured with tools/measure_golden.py (docs/device.md): threads 1 vs 2, graph optimization "
            "levels basic/extended/all, and onnxruntime's aarch64 build under qemu on cortex-a72, neoverse-n1, "
            "max,sve=off and max; the largest deviation per precision, with a margin")
LOGIT_ERROR = "max |output - golden| / max |golden| over the artifact's golden outputs"
AGREEMENT = ("fraction of samples with the golden top-1 class, over samples whose golden top-1 margin exceeds "
             "2 x max_logit_error x max |golden|")


class GoldenError(IntegrityError, ValueError):
    """A golden file that cannot be read as a TensorProto of a supported type, or is not the manifest's."""


AGAIN = "copy the export again, or re-run `edgeq export`"
MAX_BYTES = 256 << 20  # a golden tensor's default bound; verify and the device checker pass their own
_MAX_FIELDS = 4096  # protobuf fields in one TensorProto: dims and a few more (values come raw or packed)
_MAX_DIMS = 32
_MAX_NAME = 4096


# --- TensorProto, by hand -------------------------------------------------------------------------------
# onnx.proto (proto2): dims = 1 (repeated int64), data_type = 2 (int32), float_data = 4, int32_data = 5,
# int64_data = 7, name = 8 (string), raw_data = 9 (bytes), double_data = 10, uint64_data = 11.
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16,
           11: np.float64}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def tensor_bytes(array: np.ndarray, name: str) -> bytes:
    """A TensorProto holding `array` as little-endian raw_data: the bytes onnx.numpy_helper writes."""
    array = np.asarray(array)
    code = _CODES.get(array.dtype)
    if code is None:
        raise GoldenError(f"golden tensor {name!r}: dtype {array.dtype} is not supported; use float32")
    out = bytearray()
    for d in array.shape:
        out += _key(1, 0) + _varint(int(d))
    out += _key(2, 0) + _varint(code)
    encoded = name.encode("utf-8")
    out += _key(8, 2) + _varint(len(encoded)) + encoded
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    out += _key(9, 2) + _varint(len(raw)) + raw
    return bytes(out)


def parse_tensor(buf: bytes, max_bytes: int = MAX_BYTES) -> tuple[str, np.ndarray]:
    """(name, array) of a serialized TensorProto (raw_data or the typed float/double/int32/int64 fields),
    validated from its header before any value is read: see `_parse`."""
    return _parse(io.BytesIO(buf), len(buf), max_bytes)


def _parse(f, size: int, max_bytes: int) -> tuple[str, np.ndarray]:
    """Parse a TensorProto from the binary file `f` of `size` bytes in two steps: its fields are scanned
    first (dims, data type and name are kept; the data fields only located), then the shape is checked
    (dims >= 0, at most `max_bytes` once loaded, the data's byte length equal to count x item size), and
    only then are the values read, with numpy, in bounded pieces. Every problem is a GoldenError."""
    dims, code, name, data, scalars = _scan(f, size)
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise GoldenError(f"tensor {name!r}: data type {code} is not supported")
    if any(d < 0 for d in dims):
        raise GoldenError(f"tensor {name!r}: negative dimension in shape {dims}")
    count, itemsize = math.prod(dims), np.dtype(dtype).itemsize
    if count * itemsize > max_bytes:
        raise GoldenError(f"tensor {name!r}: shape {dims} declares {count * itemsize / 2**30:.3g} GiB, over the "
                          f"{max_bytes / 2**30:.3g} GiB allowed here")
    if 9 in data:  # raw_data: the last one counts, as in protobuf
        offset, length = data[9][-1]
        if length != count * itemsize:
            raise GoldenError(f"tensor {name!r}: raw_data of {length} bytes for shape {dims} of {np.dtype(dtype).name} "
                              f"({count * itemsize} bytes)")
        array = _read_fixed(f, [data[9][-1]], count, np.dtype(dtype).newbyteorder("<"))
    else:
        array = _typed(f, dtype, count, data, scalars, name)
    return name, array.astype(dtype, copy=False).reshape(dims)


def _scan(f, size: int) -> tuple[list[int], int, str, dict[int, list[tuple[int, int]]], dict[int, list]]:
    """(dims, data type, name, data fields as (offset, length) per field number, unpacked typed values)."""
    dims: list[int] = []
    code, name = 0, ""
    data: dict[int, list[tuple[int, int]]] = {}
    scalars: dict[int, list] = {}
    for _ in range(_MAX_FIELDS):
        if f.tell() >= size:
            return dims, code, name, data, scalars
        key = _read_varint(f)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = _signed(_read_varint(f))
            if field == 1:
                dims.append(value)
            elif field == 2:
                code = value
            elif field in (5, 7):
                scalars.setdefault(field, []).append(value)
        elif wire == 2:
            length = _read_varint(f)
            start = f.tell()
            if start + length > size:
                raise GoldenError("truncated field")
            if field == 1:
                if length > _MAX_DIMS * 10:
                    raise GoldenError(f"more than {_MAX_DIMS} dims")
                dims += [int(v) for v in _varints(f.read(length))]
            elif field == 8:
                if length > _MAX_NAME:
                    raise GoldenError(f"a name of {length} bytes")
                name = f.read(length).decode("utf-8", errors="replace")
            else:
                if field in (4, 5, 7, 9, 10):
                    data.setdefault(field, []).append((start, length))
                f.seek(start + length)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            raw = f.read(width)
            if len(raw) != width:
                raise GoldenError("truncated field")
            if (field, wire) in ((4, 5), (10, 1)):
                scalars.setdefault(field, []).append(struct.unpack("<f" if wire == 5 else "<d", raw)[0])
        else:
            raise GoldenError(f"unsupported protobuf wire type {wire}")
        if len(dims) > _MAX_DIMS:
            raise GoldenError(f"more than {_MAX_DIMS} dims")
    raise GoldenError(f"more than {_MAX_FIELDS} protobuf fields; a golden tensor holds its values in raw_data")


def _read_varint(f) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b or shift > 63:
            raise GoldenError("truncated varint")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _varints(chunk: bytes) -> np.ndarray:
    """Packed varints decoded with numpy (int64, two's complement), never as one Python int each."""
    b = np.frombuffer(chunk, np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if len(b) and (not len(ends) or ends[-1] != len(b) - 1):
        raise GoldenError("truncated varint")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lengths = ends - starts + 1
    if len(lengths) and lengths.max() > 10:
        raise GoldenError("a varint longer than 10 bytes")
    values = np.zeros(len(ends), np.uint64)
    for k in range(int(lengths.max()) if len(lengths) else 0):
        more = lengths > k
        values[more] |= (b[starts[more] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return values.view(np.int64)


def _read_fixed(f, chunks: list[tuple[int, int]], count: int, dtype: np.dtype) -> np.ndarray:
    """Fixed-width values (raw_data, packed floats or doubles) read into one preallocated array, CHUNK bytes
    at a time."""
    array = np.empty(count, dtype)
    view, at = array.view(np.uint8), 0
    for offset, length in chunks:
        f.seek(offset)
        end = at + length
        while at < end:
            n = f.readinto(view[at : min(end, at + bundle.CHUNK)])
            if not n:
                raise GoldenError("truncated field")
            at += n
    return array


def _typed(f, dtype, count: int, data: dict, scalars: dict, name: str) -> np.ndarray:
    """Values from the typed fields: float_data (4) and double_data (10), fixed width; int32_data (5, every
    narrower type and float16's bits) and int64_data (7), varints. Packed or (a few) unpacked, not both."""
    field = {np.float32: 4, np.float64: 10, np.int64: 7}.get(dtype, 5)
    chunks, loose = data.get(field, []), scalars.get(field, [])
    if chunks and loose:
        raise GoldenError(f"tensor {name!r}: mixes packed and unpacked values")
    if loose:
        values = np.asarray(loose)
    elif field in (4, 10):
        width = 4 if field == 4 else 8
        total = sum(length for _, length in chunks)
        if any(length % width for _, length in chunks) or total != count * width:
            raise GoldenError(f"tensor {name!r}: {total} bytes of {'float' if field == 4 else 'double'}_data for "
                              f"{count} values of {width} bytes")
        values = _read_fixed(f, chunks, count, np.dtype("<f4" if field == 4 else "<f8"))
    else:
        if sum(length for _, length in chunks) > 10 * count:
            raise GoldenError(f"tensor {name!r}: more varint bytes than {count} values can take")
        parts = []
        for offset, length in chunks:
            f.seek(offset)
            parts.append(_varints(f.read(length)))
        values = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if values.size != count:
        raise GoldenError(f"tensor {name!r}: {values.size} values for {count}")
    if dtype is np.float16 and field == 5:
        return values.astype(np.uint16).view(np.float16)
    return values.astype(dtype)


# --- the golden folder -----------------------------------------------------------------------------------


def select(inputs: np.ndarray, samples: int = SAMPLES) -> np.ndarray:
    """The golden inputs: the first `samples` of the evaluation inputs, as fed (float32)."""
    return np.ascontiguousarray(np.asarray(inputs)[:samples], dtype=np.float32)


def _entry(directory: Path, relative: str, data: bytes, shape: tuple[int, ...]) -> dict:
    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return {"file": relative, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "shape": list(shape)}


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise GoldenError(f"artifact name {name!r} cannot name a golden folder; use a plain file name")


def write(directory: Path, inputs: np.ndarray, outputs: Mapping[str, np.ndarray], *,
          input_name: str = "input", output_name: str = "logits") -> dict:
    """Write the golden inputs and each artifact's outputs on them (keyed by artifact name) under
    `directory`/golden/, and return the manifest's `golden` entry: files with bytes and sha256, the
    tolerances per precision and how they were set."""
    directory = Path(directory)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    n = len(inputs)
    entry_in = _entry(directory, f"{FOLDER}/{INPUT_FILE}", tensor_bytes(inputs, input_name), inputs.shape)
    entry_out = {}
    for name, out in sorted(outputs.items()):
        _check_name(name)
        out = np.ascontiguousarray(out, dtype=np.float32)
        if len(out) != n:
            raise GoldenError(f"golden outputs of {name}: {len(out)} rows for {n} inputs")
        entry_out[name] = _entry(directory, f"{FOLDER}/{name}/{OUTPUT_FILE}", tensor_bytes(out, output_name), out.shape)
    return {
        "format": FORMAT,
        "samples": n,
        "inputs_from": f"the first {n} samples of the evaluation data (eval.npz), as fed",
        "input": entry_in,
        "outputs": entry_out,
        "tolerances": {p: asdict(t) for p, t in TOLERANCES.items()},
        "logit_error": LOGIT_ERROR,
        "top1_agreement": AGREEMENT,
        "tolerances_from": SET_FROM,
    }


def read_tensor(path: Path, sha256: str | None = None, shown: str | None = None,
                max_bytes: int = MAX_BYTES) -> np.ndarray:
    """The array of a golden .pb file, opened without following a link or blocking, at most `max_bytes`
    on disk and once loaded; with `sha256`, only if the file has that hash (streamed). GoldenError, naming
    the file as `shown`, for every problem."""
    shown = shown or Path(path).name
    try:
        f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb")
    except FileNotFoundError:
        raise GoldenError(f"{shown}: missing") from None
    except OSError as exc:
        raise GoldenError(f"{shown}: cannot read ({exc.strerror}); a golden file must be a regular file") from None
    with f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise GoldenError(f"{shown}: not a regular file")
        if st.st_size > max_bytes:
            raise GoldenError(f"{shown}: {st.st_size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.1f} MiB a golden "
                              "tensor may take here (a quarter of --memory-limit); raise --memory-limit")
        if sha256 is not None and bundle.sha256_of(f) != sha256:
            raise GoldenError(f"{shown}: sha256 differs from the manifest's")
        try:
            f.seek(0)
            return _parse(f, st.st_size, max_bytes)[1]
        except GoldenError as exc:
            raise GoldenError(f"{shown}: not a TensorProto ({exc})") from None


def read_listed(directory: Path, item: object, what: str, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """The array of a golden file a manifest lists (`item`: file, sha256, shape), read with edgeq.bundle's
    rules: inside `directory`, no symlink on its path, a regular file of at most `max_bytes`, its sha256."""
    if not (isinstance(item, Mapping) and isinstance(item.get("file"), str) and isinstance(item.get("sha256"), str)):
        raise GoldenError(f"the manifest's entry for {what} is not a file with a sha256; re-export")
    file = item["file"]
    problem = bundle.path_problem(directory, file)
    if problem is not None:
        fix = "" if problem == "missing" or problem.startswith("cannot read") else f"; {AGAIN}"
        raise GoldenError(f"{file}: {problem} ({what}){fix}")
    array = read_tensor(Path(directory) / file, item["sha256"], file, max_bytes)
    shape = item.get("shape", list(array.shape))
    if list(array.shape) != shape:
        raise GoldenError(f"{file}: shape {list(array.shape)}, the manifest says {shape}")
    return array


def read(directory: Path, entry: Mapping, name: str | None = None,
         max_bytes: int = MAX_BYTES) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The golden inputs and outputs named in a manifest's `golden` entry (all, or only artifact `name`),
    each read by `read_listed`. Raises GoldenError naming the first file that is missing or differs."""
    inputs = read_listed(directory, entry.get("input"), "the golden inputs", max_bytes)
    if inputs.ndim < 2 or not len(inputs):
        raise GoldenError(f"{entry['input']['file']}: shape {list(inputs.shape)} holds no batch of inputs; re-export")
    outputs_entry = entry.get("outputs")
    if not isinstance(outputs_entry, Mapping):
        raise GoldenError("the manifest's golden entry lists no outputs; re-export")
    names = [name] if name is not None else sorted(outputs_entry)
    outputs = {}
    for n in names:
        if n not in outputs_entry:
            raise GoldenError(f"{n}: no golden outputs in the manifest")
        outputs[n] = read_listed(directory, outputs_entry[n], f"golden outputs of {n}", max_bytes)
    return inputs, outputs


def tolerance(entry: Mapping, precision: str) -> Tolerance:
    """The tolerance of a precision: edgeq.policy's, or the manifest's where it states a stricter one (a
    manifest can tighten the rule book, never loosen it)."""
    rule = TOLERANCES.get(precision, TOLERANCES["fp32"])
    stated = entry.get("tolerances") if isinstance(entry, Mapping) else None
    t = stated.get(precision) if isinstance(stated, Mapping) else None
    if not isinstance(t, Mapping):
        return rule
    error, agreement = t.get("max_logit_error"), t.get("min_top1_agreement")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return Tolerance(min(rule.max_logit_error, error) if number(error) and error >= 0 else rule.max_logit_error,
                     max(rule.min_top1_agreement, agreement) if number(agreement) else rule.min_top1_agreement)


def compare(golden: np.ndarray, output: np.ndarray, tol: Tolerance) -> dict:
    """How far `output` is from `golden` (logit error, top-1 agreement), and whether `tol` is met; both
    [samples, classes], at least one sample."""
    golden64, output64 = golden.astype(np.float64), output.astype(np.float64)
    scale = float(np.abs(golden64).max()) or 1.0
    error = float(np.abs(output64 - golden64).max()) / scale
    top = np.sort(golden64, axis=1)
    margin = top[:, -1] - top[:, -2] if golden.shape[1] > 1 else np.full(len(golden), np.inf)
    decided = margin > 2 * tol.max_logit_error * scale
    same = golden64.argmax(1) == output64.argmax(1)
    agreement = float(same[decided].mean()) if decided.any() else 1.0
    return {
        "max_logit_error": error,
        "top1_agreement": agreement,
        "top1_agreement_all": float(same.mean()),
        "samples_decided": int(decided.sum()),
        "bit_equal": bool(np.array_equal(golden, output)),
        "tolerance": asdict(tol),
        "ok": error <= tol.max_logit_error and agreement >= tol.min_top1_agreement,
    }
