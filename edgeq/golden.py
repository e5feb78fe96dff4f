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
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeq.manifest import sha256_file  # torch-free: the manifest module imports the standard library only

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


# Set from docs/device.md's measurement. fp32: at most 1.7e-7 measured (threads, optimization levels,
# the four ARM CPUs), 1e-5 leaves room for larger models' longer sums in another order. int8: 0 to
# 2.7e-7 measured (the int8 kernels agreed bit for bit across x86 and ARM); 1e-2 is about one
# quantization step of an 8-bit range (1/127), what one intermediate value rounded the other way
# moves the logits by, while a changed weight moves them by 1 or more.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_logit_error=1e-5, min_top1_agreement=1.0),
    "int8": Tolerance(max_logit_error=1e-2, min_top1_agreement=1.0),
}
SET_FROM = ("measured with tools/measure_golden.py (docs/device.md): threads 1 vs 2, graph optimization "
            "levels basic/extended/all, and onnxruntime's aarch64 build under qemu on cortex-a72, neoverse-n1, "
            "max,sve=off and max; the largest deviation per precision, with a margin")
LOGIT_ERROR = "max |output - golden| / max |golden| over the artifact's golden outputs"
AGREEMENT = ("fraction of samples with the golden top-1 class, over samples whose golden top-1 margin exceeds "
             "2 x max_logit_error x max |golden|")


class GoldenError(ValueError):
    """A golden file that cannot be read as a TensorProto of a supported type."""


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


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise GoldenError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def parse_tensor(buf: bytes) -> tuple[str, np.ndarray]:
    """(name, array) of a serialized TensorProto (raw_data or the typed float/int32/int64 fields)."""
    dims: list[int] = []
    code, name, raw = 0, "", None
    typed: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
            if value >= 1 << 63:
                value -= 1 << 64
            if field == 1:
                dims.append(value)
            elif field == 2:
                code = value
            elif field in (5, 7):
                typed.setdefault(field, []).append(value)
        elif wire == 2:
            length, i = _read_varint(buf, i)
            if i + length > len(buf):
                raise GoldenError("truncated field")
            chunk, i = buf[i : i + length], i + length
            if field == 1 or field in (5, 7):  # packed varints
                j, values = 0, []
                while j < len(chunk):
                    v, j = _read_varint(chunk, j)
                    values.append(v - (1 << 64) if v >= 1 << 63 else v)
                (dims if field == 1 else typed.setdefault(field, [])).extend(values)
            elif field == 4:  # packed floats
                typed.setdefault(4, []).extend(struct.unpack(f"<{length // 4}f", chunk))
            elif field == 10:
                typed.setdefault(10, []).extend(struct.unpack(f"<{length // 8}d", chunk))
            elif field == 8:
                name = chunk.decode("utf-8", errors="replace")
            elif field == 9:
                raw = chunk
        elif wire == 5:
            if field == 4:
                typed.setdefault(4, []).extend(struct.unpack("<f", buf[i : i + 4]))
            i += 4
        elif wire == 1:
            if field == 10:
                typed.setdefault(10, []).extend(struct.unpack("<d", buf[i : i + 8]))
            i += 8
        else:
            raise GoldenError(f"unsupported protobuf wire type {wire}")
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise GoldenError(f"tensor {name!r}: data type {code} is not supported")
    count = int(np.prod(dims)) if dims else 1
    if raw is not None:
        array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    else:
        values = typed.get({np.float32: 4, np.float64: 10, np.int64: 7}.get(dtype, 5), [])
        array = np.asarray(values, dtype=dtype)
    if array.size != count:
        raise GoldenError(f"tensor {name!r}: {array.size} values for shape {dims}")
    return name, array.reshape(dims)


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


def read_tensor(path: Path, sha256: str | None = None, shown: str | None = None) -> np.ndarray:
    """The array of a golden .pb file; with `sha256`, only if the file has that hash (GoldenError, naming
    the file as `shown`, if not)."""
    data = Path(path).read_bytes()
    shown = shown or Path(path).name
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise GoldenError(f"{shown}: sha256 differs from the manifest's")
    try:
        return parse_tensor(data)[1]
    except GoldenError as exc:
        raise GoldenError(f"{shown}: not a TensorProto ({exc})") from None


def read(directory: Path, entry: Mapping, name: str | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The golden inputs and outputs named in a manifest's `golden` entry (all, or only artifact `name`),
    each checked against its sha256. Raises GoldenError naming the first file that is missing or differs."""
    directory = Path(directory)

    def load(item: Mapping, what: str) -> np.ndarray:
        path = directory / item["file"]
        if not path.is_file():
            raise GoldenError(f"{item['file']}: missing ({what})")
        array = read_tensor(path, item["sha256"], item["file"])
        if list(array.shape) != list(item.get("shape", array.shape)):
            raise GoldenError(f"{item['file']}: shape {list(array.shape)}, the manifest says {item['shape']}")
        return array

    inputs = load(entry["input"], "the golden inputs")
    names = [name] if name is not None else sorted(entry["outputs"])
    outputs = {}
    for n in names:
        if n not in entry["outputs"]:
            raise GoldenError(f"{n}: no golden outputs in the manifest")
        outputs[n] = load(entry["outputs"][n], f"golden outputs of {n}")
    return inputs, outputs


def tolerance(entry: Mapping, precision: str) -> Tolerance:
    """The tolerance the manifest states for a precision (the defaults here when it states none)."""
    t = entry.get("tolerances", {}).get(precision)
    return Tolerance(**t) if t else TOLERANCES[precision]


def compare(golden: np.ndarray, output: np.ndarray, tol: Tolerance) -> dict:
    """How far `output` is from `golden` (logit error, top-1 agreement), and whether `tol` is met."""
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
