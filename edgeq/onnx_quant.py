"""onnxruntime QDQ int8: a file in, a file out, in the style of onnxruntime's own quantization tool.

`quantize_onnx(fp32_path, path, calibration, QDQConfig(...))` pre-processes the fp32 file, applies
exact graph rewrites that let onnxruntime fuse more of the int8 graph (relu before max-pool, padding
taps cut, float logits), quantizes with `onnxruntime.quantization.quantize_static` and checks the
result with onnx.checker. The format follows the target the file is built for (edgeq.target).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import ExportError
from edgeq.plan import data_sha256
from edgeq.publish import disk_full_as_enospc
from edgeq.runtime import INPUT_NAME

# onnxruntime's Entropy calibrator by default histograms a tensor into 128 bins and searches thresholds of
# 128 quantized bins: one candidate, the whole range, so its ranges are MinMax's to the bit. The KL search
# it stands for (TensorRT's) runs on 2048 bins: 961 thresholds per tensor, about half a second per tensor in Python
ENTROPY_OPTIONS = {"num_bins": 2048, "num_quantized_bins": 128}


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {exc}") from None


@dataclass(frozen=True)
class QDQConfig:
    """onnxruntime static QDQ quantization settings: int8 weights with uint8 activations (U8S8, x86) or
    int8 activations (S8S8, ARM); each target's format is edgeq.target's `Target.qdq()`."""

    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights: avoids u8*s8 pair-sum saturation on AVX2 without VNNI
    activations: str = "uint8"  # uint8 (U8S8) | int8 (S8S8)
    calibrate_method: str = "MinMax"
    exclude_nodes: tuple[str, ...] = ()  # kept in fp32 (mixed precision)
    # Exact rewrites that let onnxruntime fuse more of the int8 graph:
    relu_before_pool: bool = True  # int8 Conv->MaxPool->Relu becomes Conv->Relu->MaxPool (max and relu commute)
    float_outputs: bool = True  # logits leave the last int8 layer as float, not re-quantized to uint8
    crop_padding: bool = True  # conv kernel taps that only ever see zero padding at the input size are cut (exact in fp32)
    # each int8-weight layer's bias corrected by the mean shift its rounded weights cause (edgeq.bias)
    bias_correction: bool = False

    def describe(self) -> dict:
        return {
            "method": "static", "runtime": "onnxruntime", "format": "QDQ", "engine": "onnxruntime CPU",
            "weights": "int8", "activations": self.activations,
            "calibration": f"{self.calibrate_method}", "per_channel": self.per_channel,
            "reduce_range": self.reduce_range, "fp32_nodes": list(self.exclude_nodes),
            "relu_before_pool": self.relu_before_pool, "float_outputs": self.float_outputs,
            "crop_padding": self.crop_padding, **({"bias_correction": True} if self.bias_correction else {}),
        }


class CalibrationReader:
    """onnxruntime's calibration contract: get_next() returns a feed dict, then None."""

    def __init__(self, batches: list[np.ndarray]):
        self._it = iter(batches)

    def get_next(self):
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}


@contextlib.contextmanager
def quiet_quantization() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger, prints its histogram calibrators'
    progress to stdout, and torch/onnx warn: mute all three, here only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def quantize_onnx(fp32_path: Path, path: Path, calibration: list[np.ndarray], cfg: QDQConfig = QDQConfig()) -> Path:
    """fp32 ONNX -> QDQ int8 ONNX with onnxruntime.quantization (pre-processed, then static)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        return QDQBuilder(fp32_path, Path(work)).build(path, calibration, cfg)


def ort_tools_without_torch() -> None:
    """`onnxruntime.tools` imported, in a process that has not imported torch, without importing it.

    `quant_pre_process` imports `onnxruntime.tools.symbolic_shape_infer`. Its package's `__init__` imports torch
    where torch is installed (2-3 s on a 2-core machine) for one helper, `infer_input_info`, which nothing of
    onnxruntime's quantization uses: a pool or Ray worker's first ONNX trial paid for it. Here the package is
    imported with torch hidden from it (`sys.modules["torch"] = None` for the length of its `__init__`, which only
    looks torch up), then given `have_torch` as it would have had it, and `infer_input_info` on first use (a module
    `__getattr__`, PEP 562; kept as an attribute once imported, and listed by `dir()`). Nothing where torch is
    imported already or `onnxruntime.tools` is. While hidden, an `import torch` in another thread would fail: the
    processes that get here (pool and Ray workers) run one trial at a time, and an exporting process has torch."""
    import importlib
    import importlib.util
    import sys

    if "torch" in sys.modules or "onnxruntime.tools" in sys.modules:
        return
    importlib.import_module("onnxruntime")  # the parent first: only the package's own `__init__` runs hidden
    try:
        sys.modules["torch"] = None  # type: ignore[assignment]  # find_spec("torch") -> None
        tools = importlib.import_module("onnxruntime.tools")
    finally:
        if sys.modules.get("torch", False) is None:
            del sys.modules["torch"]
    tools.have_torch = importlib.util.find_spec("torch")
    if tools.have_torch is not None and "infer_input_info" not in vars(tools):
        tools.__getattr__ = _infer_input_info
        tools.__dir__ = lambda: sorted({*vars(tools), "infer_input_info"})


def _infer_input_info(name: str):
    """`onnxruntime.tools.infer_input_info`, imported (with torch) when first asked for, then kept on the module."""
    if name != "infer_input_info":
        raise AttributeError(f"module 'onnxruntime.tools' has no attribute {name!r}")
    import sys

    from onnxruntime.tools.pytorch_export_helpers import infer_input_info

    sys.modules["onnxruntime.tools"].infer_input_info = infer_input_info
    return infer_input_info


class QDQBuilder:
    """The int8 files of one fp32 parent, each built once per setting, pre-processing and calibration shared.

    Every trial of a parent (calibration candidates, sensitivity, the accuracy bar, the speed search)
    quantizes the same fp32 file with another setting. What a setting changes is only which nodes stay
    fp32 and the weight format; the rewritten, pre-processed graph depends only on which convolutions
    the relu-before-pool rewrite leaves alone, and the activation ranges only on that graph, the
    calibration method and the calibration samples. So each distinct graph is pre-processed once, and
    calibrated once per (method, samples): onnxruntime's own calibration cache
    (`quantize_static(calibration_cache_path=...)`) then quantizes every trial from those ranges. The
    files are the bytes `quantize_onnx` writes for the same settings. With `bias_correction`, the
    pre-processed graph's biases are corrected (edgeq.bias) once per weight format, fp32 layers and
    samples, and quantized with the ranges of the uncorrected graph: the int8 file approximates the
    original fp32 model, whose activations those ranges are.
    """

    def __init__(self, fp32_path: Path, work: Path):
        self.fp32_path, self.work = Path(fp32_path), Path(work)
        self._prepared: dict[tuple, Path] = {}
        self._ranges: dict[tuple, Path] = {}
        self._corrected: dict[tuple, tuple[Path, dict]] = {}
        self.calibrations = 0  # calibration passes run (each is a run of the augmented graph on the samples)
        self.weights = WeightMemo()  # every trial quantizes the same weights

    def build(self, path: Path, calibration: list[np.ndarray], cfg: QDQConfig) -> Path:
        """The int8 file of `cfg`, written to `path` and checked with onnx.checker."""
        with quiet_quantization(), disk_full_as_enospc(Path(path).parent):
            pre = self.prepared(cfg)
            ranges = self.ranges(pre, calibration, cfg.calibrate_method)
            if cfg.bias_correction:
                pre = self.corrected(pre, calibration, cfg)[0]
            with self.weights.installed() if cfg.per_channel else contextlib.nullcontext():
                self._quantize(pre, Path(path), ranges, cfg)
        check_onnx(path)
        return path

    def prepared(self, cfg: QDQConfig) -> Path:
        """The rewritten, pre-processed fp32 graph for `cfg` (built once per distinct graph)."""
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        model = None
        if cfg.relu_before_pool or cfg.crop_padding:
            cropped = _cropped(self.fp32_path) if cfg.crop_padding else None
            model = onnx.load_from_string(cropped) if cropped is not None else onnx.load(str(self.fp32_path))
            rewritten = relu_before_maxpool(model, skip=set(cfg.exclude_nodes)) if cfg.relu_before_pool else []
            key = (cfg.crop_padding and cropped is not None, tuple(rewritten))
            if not rewritten and cropped is None:
                model = None
        else:
            key = (False, ())
        if key not in self._prepared:
            source = self.fp32_path
            if model is not None:
                source = self.work / f"rewritten-{len(self._prepared)}.onnx"
                onnx.save(model, str(source))
            pre = self.work / f"pre-{len(self._prepared)}.onnx"
            ort_tools_without_torch()  # what quant_pre_process imports, without torch: once per process
            quant_pre_process(str(source), str(pre))
            self._prepared[key] = pre
        return self._prepared[key]

    def ranges(self, pre: Path, calibration: list[np.ndarray], method: str) -> Path:
        """onnxruntime's calibration cache of a pre-processed graph for `method` on `calibration`."""
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        key = (pre, method, data_sha256(*calibration))
        if key not in self._ranges:
            cache = self.work / f"ranges-{len(self._ranges)}.json"
            with tempfile.TemporaryDirectory(dir=self.work) as tmp:
                # what quantize_static calibrates when given no cache: every tensor of every op type it quantizes
                calibrator = create_calibrator(pre, list(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                               augmented_model_path=str(Path(tmp) / "augmented_model.onnx"),
                                               calibrate_method=getattr(CalibrationMethod, method),
                                               extra_options=ENTROPY_OPTIONS if method == "Entropy" else {})
                calibrator.collect_data(CalibrationReader(calibration))
                save_tensors_data(calibrator.compute_data(), cache)
                del calibrator
            self.calibrations += 1
            self._ranges[key] = cache
        return self._ranges[key]

    def corrected(self, pre: Path, calibration: list[np.ndarray], cfg: QDQConfig) -> tuple[Path, dict]:
        """The pre-processed graph `pre` with its biases corrected for `cfg`'s int8 weights on `calibration`
        (edgeq.bias.correct_prepared), and the record of the correction; made once per setting."""
        from edgeq.bias import correct_prepared

        key = (pre, cfg.per_channel, cfg.reduce_range, tuple(sorted(cfg.exclude_nodes)), data_sha256(*calibration))
        if key not in self._corrected:
            out = self.work / f"corrected-{len(self._corrected)}.onnx"
            self._corrected[key] = (out, correct_prepared(pre, out, calibration, cfg))
        return self._corrected[key]

    @staticmethod
    def _quantize(pre: Path, path: Path, ranges: Path, cfg: QDQConfig) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        quantize_static(
            str(pre), str(path), None, calibration_cache_path=str(ranges),
            quant_format=QuantFormat.QDQ, weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8 if cfg.activations == "int8" else QuantType.QUInt8,
            per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
            calibrate_method=getattr(CalibrationMethod, cfg.calibrate_method),
            nodes_to_exclude=list(cfg.exclude_nodes),
        )
        if cfg.float_outputs:
            import onnx

            model = onnx.load(str(path))
            if float_outputs(model):
                onnx.save(model, str(path))


class WeightMemo:
    """onnxruntime's weight quantization, computed once per weight for every trial of a parent.

    `quantize_static` computes a per-channel weight's scales one channel at a time in Python and quantizes
    it one channel at a time: about half of an efficientnet_b0 trial's build, the same for every trial,
    which changes only which nodes stay fp32. Both steps are pure functions of the weight's values and the
    settings, so while `installed`, onnxruntime's QDQ quantizer calls them through this memo, keyed by a
    digest of those values and every argument: the files are the bytes it writes without it
    (tests/test_bias.py). Per-tensor weights are quantized in vectorized calls that cost about what a digest
    of the weight does: `QDQBuilder` installs the memo for per-channel builds only (benchmarks/builds.py)."""

    def __init__(self) -> None:
        self._params: dict[tuple, tuple] = {}
        self._tensors: dict[tuple, bytes] = {}
        self.hits = self.misses = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from onnxruntime.quantization import qdq_quantizer

        params, tensor = qdq_quantizer.compute_data_quant_params, qdq_quantizer.quantize_onnx_initializer
        qdq_quantizer.compute_data_quant_params = functools.partial(self._param, params)
        qdq_quantizer.quantize_onnx_initializer = functools.partial(self._tensor, tensor)
        try:
            yield
        finally:
            qdq_quantizer.compute_data_quant_params, qdq_quantizer.quantize_onnx_initializer = params, tensor

    def _param(self, compute, data, *args, **kwargs):
        key = (data_sha256(data), args, tuple(sorted(kwargs.items())))
        try:
            hash(key)
        except TypeError:  # an array among the arguments (a range override): computed, not kept
            return compute(data, *args, **kwargs)
        if key not in self._params:
            self.misses += 1
            self._params[key] = compute(data, *args, **kwargs)
        else:
            self.hits += 1
        return tuple(a.copy() for a in self._params[key])

    def _tensor(self, quantize, weight, quant_type, zero_point, scale, axis=None, quant_weight_name=None,
                block_size=0):
        import onnx

        if axis is None or block_size:
            return quantize(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size)
        key = (hashlib.sha256(weight.SerializeToString()).digest(), quant_type, data_sha256(zero_point),
               data_sha256(scale), axis, quant_weight_name)
        if key not in self._tensors:
            self.misses += 1
            self._tensors[key] = quantize(weight, quant_type, zero_point, scale, axis, quant_weight_name,
                                          block_size).SerializeToString()
        else:
            self.hits += 1
        out = onnx.TensorProto()
        out.ParseFromString(self._tensors[key])
        return out


def _cropped(fp32_path: Path) -> bytes | None:
    """`crop_padding_taps` of a file, serialized (None: nothing to cut). Every trial of one fp32 parent
    (search, calibration, sensitivity, the bar) quantizes the same file: its shape inference runs once."""
    st = fp32_path.stat()
    return _cropped_cached(str(fp32_path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cropped_cached(path: str, size: int, mtime_ns: int) -> bytes | None:
    import onnx

    model = onnx.load(path)
    return model.SerializeToString() if crop_padding_taps(model) else None


def _consumers(graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def relu_before_maxpool(model, skip: set[str] = frozenset()) -> list[str]:
    """Rewrite Conv -> MaxPool -> Relu as Conv -> Relu -> MaxPool in place; returns the convs rewritten.

    Exact: relu is monotone, so max(relu(x)) == relu(max(x)). In int8, onnxruntime then fuses the
    Relu into the QLinearConv and pools the uint8 output in NHWC, instead of de-quantizing to pool
    in fp32. Convs named in `skip` (kept in fp32) are left alone: there the pool must stay in fp32
    before the QuantizeLinear, or onnxruntime pools in a slow generic uint8 kernel.
    """
    graph = model.graph
    users, outputs = _consumers(graph), {o.name for o in graph.output}
    nodes, done = list(graph.node), []
    for conv in [n for n in nodes if n.op_type == "Conv" and n.name not in skip]:
        pool = users.get(conv.output[0], [])
        if len(pool) != 1 or pool[0].op_type != "MaxPool" or len(pool[0].output) != 1:
            continue
        pool = pool[0]
        relu = users.get(pool.output[0], [])
        if len(relu) != 1 or relu[0].op_type != "Relu" or {conv.output[0], pool.output[0]} & outputs:
            continue
        relu = relu[0]
        pooled, out = pool.output[0], relu.output[0]
        taken = {t for n in graph.node for t in (*n.input, *n.output)} | {i.name for i in graph.input}
        inner = f"{relu.name or out}_before_pool"
        while inner in taken:
            inner += "_"
        relu.input[0], relu.output[0] = conv.output[0], inner
        pool.input[0], pool.output[0] = relu.output[0], out
        i, j = nodes.index(pool), nodes.index(relu)
        nodes[i], nodes[j] = relu, pool
        kept = [v for v in graph.value_info if v.name != pooled]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        done.append(conv.name)
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def crop_padding_taps(model) -> int:
    """Cut each Conv kernel to the taps that ever read the input, at the model's fixed spatial size;
    returns how many convs changed.

    Exact for the fp32 graph: a tap that only ever lands on zero padding multiplies zeros at every
    output position, so dropping it (and shifting the padding by as many taps) changes no output
    beyond the last bits of a float sum taken in another order. In int8 the per-channel weight scales
    are then computed over the taps that matter, so the int8 weights differ (they can only gain
    resolution). It matters when a
    network built for large images runs small ones: resnet18 at 32x32 runs layer4's 3x3 convs on a
    1x1 map, where only the centre tap sees data, and the cut kernels hold 9x fewer weights.
    A conv is left alone when its input's spatial size is unknown, it is dilated or auto-padded,
    or its weight is shared or not stored in the file."""
    import onnx
    from onnx import helper, numpy_helper
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.value_info, *inferred.input)}
    weights, users, done = {t.name: t for t in graph.initializer}, _consumers(graph), 0
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        shape = shapes.get(conv.input[0])
        if (len(conv.input) < 2 or conv.input[1] not in weights or len(users[conv.input[1]]) != 1
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            continue
        w = numpy_helper.to_array(weights[conv.input[1]])
        dims = w.ndim - 2
        if shape is None or len(shape) != w.ndim or any(s is None for s in shape[2:]):
            continue
        strides, dilations = attrs.get("strides", [1] * dims), attrs.get("dilations", [1] * dims)
        pads = attrs.get("pads", [0] * 2 * dims)
        if any(d != 1 for d in dilations):
            continue
        keep, begin, end = [], [], []
        for size, k, s, pb, pe in zip(shape[2:], w.shape[2:], strides, pads[:dims], pads[dims:]):
            cut = kept_taps(size, k, s, pb, pe)
            if cut is None:
                break
            keep.append(cut[0])
            begin.append(cut[1])
            end.append(cut[2])
        else:
            if all(sl.stop - sl.start == k for sl, k in zip(keep, w.shape[2:])):
                continue
            cut = np.ascontiguousarray(w[(slice(None), slice(None), *keep)])
            weights[conv.input[1]].CopyFrom(numpy_helper.from_array(cut, conv.input[1]))
            kept = [a for a in conv.attribute if a.name not in ("kernel_shape", "pads")]
            del conv.attribute[:]
            conv.attribute.extend([*kept, helper.make_attribute("kernel_shape", list(cut.shape[2:])),
                                   helper.make_attribute("pads", begin + end)])
            done += 1
    return done


def kept_taps(size: int, k: int, stride: int, pad_begin: int, pad_end: int) -> tuple[slice, int, int] | None:
    """Along one spatial axis of a convolution (no dilation): the kernel taps that ever read the input, and
    the padding (begin, end) that keeps every output position with only those; None when every window
    reads padding only, or no cut keeps the output size."""
    out = (size + pad_begin + pad_end - k) // stride + 1
    used = [t for t in range(k) if any(0 <= o * stride - pad_begin + t < size for o in range(out))]
    if not used:
        return None
    first, k2 = used[0], used[-1] - used[0] + 1
    b2 = pad_begin - first
    e2 = max(0, (out - 1) * stride + k2 - size - b2)
    if (size + b2 + e2 - k2) // stride + 1 != out:
        return None
    return slice(first, first + k2), b2, e2


def float_outputs(model) -> int:
    """Drop QuantizeLinear -> DequantizeLinear pairs that feed graph outputs; returns how many.

    The last int8 layer then writes float logits itself (onnxruntime's QGemm/QLinearConv with
    float output): one node less per call and no rounding of the logits to 256 levels. A pair is
    left alone when anything else reads the logits or the tensor before the pair.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    users, outputs, done = _consumers(graph), {o.name for o in graph.output}, 0
    for out in graph.output:
        dq = producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear" or users.get(out.name):
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(users.get(q.output[0], [])) != 1:
            continue
        source = producer.get(q.input[0])
        if source is None or len(users.get(q.input[0], [])) != 1 or q.input[0] in outputs:
            continue
        source.output[list(source.output).index(q.input[0])] = out.name
        graph.node.remove(q)
        graph.node.remove(dq)
        done += 1
    if done:  # their scales and zero points are now read by nothing
        read = {name for n in graph.node for name in n.input}
        kept = [init for init in graph.initializer if init.name in read]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return done
