"""Bias correction for int8 ONNX files: an fp32 file in, the same fp32 file with corrected biases out.

Rounding a layer's weights to int8 shifts the mean of its output: E[(W_q - W) x] is not zero when the
rounding errors of a channel do not cancel against the input's mean, which is typical of layers with
few weights per output channel (depthwise convolutions) and of 7-bit (`reduce_range`) weights. Empirical
bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", section 4.2) subtracts that shift from the layer's bias, measured on the calibration
samples, so that the int8 layer's output has the fp32 layer's mean.

The int8 weights are recomputed exactly as onnxruntime's `quantize_static` (QDQ) will write them: on the
graph it is handed (edgeq's rewrites, the padding crop, `quant_pre_process`: `QDQBuilder.prepared`),
symmetric int8 per channel or per tensor as `QDQConfig.per_channel`, 7-bit when `reduce_range`, with
onnxruntime's own `compute_data_quant_params` and `quantize_nparray`. Layers kept fp32
(`exclude_nodes`) are left alone.

Two ways to measure the shift were built and compared (benchmarks/bias.py):
- "analytic": (W_q - W) summed over a convolution's kernel taps, times the per-channel mean of the
  layer's fp32 input. It neglects that taps over zero padding read zeros at the borders and that a
  strided convolution samples only some positions, so it is exact only for a dense layer or a map
  whose mean is the same at every tap (on the small maps of 32x32 networks most positions are borders).
- "empirical" (kept): the mean over samples and positions of conv(x, W_q - W), i.e. of the int8-weight
  output minus the fp32 output, both from the fp32 input x, run in onnxruntime on the calibration
  samples. It is the exact mean shift the weights cause, borders and strides included, at the same
  cost (one extra convolution per layer in one pass). For Gemm and MatMul the two are identical.
Measured on the validation split (MNIST CNN, mobilenet_v3_small, mobilenet_v2, efficientnet_b0, each in
the x86 and arm64 formats), "empirical" gave the higher logit SQNR against fp32 in 7 of 8 cases (by
0.03-0.6 dB; mobilenet_v2 arm64: 0.76 dB lower), and agreement and accuracy between the two differ by a
few samples either way, within noise. It is kept for that and because it is exact by construction.
Whether correcting helps at all is for the caller to measure per model: the logit SQNR rose in every
case measured on validation (QDQConfig.bias_correction), top-1 agreement did not.

What neither corrects: the shift that int8 activations add, a layer's input already shifted by the
int8 layers before it (both outputs are taken from fp32 inputs), and onnxruntime raising a weight's
scale when a bias is too large for int32 at `input_scale * weight_scale` (never the case for trained
biases; the layer is then quantized coarser than assumed here). For a MatMul + Add, onnxruntime
quantizes the Add's constant to 8 bits per tensor like an activation: the correction survives to
within that step.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.onnx_quant import QDQConfig, check_onnx

METHODS = ("empirical", "analytic")
DEFAULT_METHOD = "empirical"  # higher validation SQNR than "analytic" in 7 of 8 measurements (module docstring)
OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Layer:
    """A Conv, Gemm or MatMul+Add whose weights onnxruntime will quantize, with what its correction needs."""

    node: str  # the node's name (the same in the fp32 file and the graph quantize_static is handed)
    op: str
    input: str  # the activation the weights multiply
    weight: str  # its initializer
    bias: str | None  # the initializer holding its bias (Conv/Gemm input 2, MatMul: the Add's constant); None: none yet
    add: str | None  # MatMul: the Add node that adds the bias
    delta: np.ndarray  # W_q - W, in the weight's own layout
    to_bias: float  # the bias moves by this times (W_q - W) E[x] (Gemm: alpha / beta, its scales of A B and C; else 1)


def int8_weights(w: np.ndarray, axis: int | None, reduce_range: bool) -> np.ndarray:
    """`w` as onnxruntime's QDQ quantizer stores it, dequantized: symmetric int8 (7-bit with
    `reduce_range`), one scale per slice along `axis` (None: one scale for the tensor)."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

    def one(part: np.ndarray) -> np.ndarray:
        zero, scale = compute_data_quant_params(part.ravel(), TensorProto.INT8, True, reduce_range=reduce_range)
        q = quantize_nparray(TensorProto.INT8, part.ravel(), scale, zero)
        return ((q.astype(np.float32) - np.float32(zero)) * np.float32(scale)).reshape(part.shape)

    if axis is None:
        return one(w)
    return np.stack([one(w.take(i, axis)) for i in range(w.shape[axis])], axis=axis)


def find_layers(model, cfg: QDQConfig) -> tuple[list[Layer], dict[str, str]]:
    """The layers of `model` (the graph quantize_static is handed) whose weights it quantizes under `cfg`,
    and the compute nodes left alone with the reason."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    layers, skipped = [], {}
    for n in graph.node:
        if n.op_type not in OPS:
            continue
        found = _layer(n, inits, users, outputs, cfg)
        if isinstance(found, str):
            skipped[n.name or n.output[0]] = found
        else:
            layers.append(found)
    return layers, skipped


def _layer(n, inits: dict, users: dict, outputs: set, cfg: QDQConfig) -> Layer | str:
    """One compute node as a Layer whose bias can be corrected, or why it cannot."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    if not n.name:
        return "unnamed node"
    if n.name in set(cfg.exclude_nodes):
        return "kept fp32"
    if len(n.input) < 2 or n.input[1] not in inits or n.input[0] in inits:
        return "weights are not an initializer"
    w = numpy_helper.to_array(inits[n.input[1]])
    if w.dtype != np.float32:
        return f"{w.dtype} weights"
    bias, add, to_bias, axis = None, None, 1.0, None
    if n.op_type == "Conv":
        axis = 0
    elif n.op_type == "Gemm":
        if attrs.get("transA", 0) or w.ndim != 2:
            return "transposed input"
        axis = 0 if attrs.get("transB", 0) else 1
        beta = float(attrs.get("beta", 1.0))
        if beta == 0.0:
            return "beta = 0: no bias term"
        to_bias = float(attrs.get("alpha", 1.0)) / beta
    else:  # MatMul: x @ W (+ b in the one Add that reads it)
        if w.ndim != 2:
            return "weights of rank != 2"
        axis = 1
        after = users.get(n.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add" and n.output[0] not in outputs:
            other = [i for i in after[0].input if i != n.output[0]]
            if len(other) == 1 and other[0] in inits:
                bias, add = other[0], after[0].name
        if bias is None:
            return "no Add of a constant bias"
    if n.op_type != "MatMul" and len(n.input) > 2 and n.input[2]:
        bias = n.input[2]
        if bias not in inits:
            return "bias is not an initializer"
    if bias is not None:
        b = numpy_helper.to_array(inits[bias])
        if len(users.get(bias, [])) != 1 or b.dtype != np.float32 or b.size != w.shape[axis] or (
                b.ndim and b.shape[-1] != b.size):
            return "bias shared or not one value per output channel"
    delta = int8_weights(w, axis if cfg.per_channel else None, cfg.reduce_range) - w
    return Layer(n.name, n.op_type, n.input[0], n.input[1], bias, add, delta, to_bias)


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def output_shifts(model, layers: list[Layer], calibration: list[np.ndarray], method: str = DEFAULT_METHOD
                  ) -> dict[str, np.ndarray]:
    """Per layer, the mean over the calibration samples (and positions) of (int8-weight output - fp32
    output), per output channel, from the fp32 graph `model`; float64. One onnxruntime pass (one thread, no
    graph optimizations: the same sums on every machine) over a copy of the graph that also reduces, per
    layer, the input to its channel means ("analytic") or conv(input, W_q - W) to its channel means
    ("empirical", convolutions only)."""
    if method not in METHODS:
        raise ValueError(f"bias correction method {method!r}: choose one of {', '.join(METHODS)}")
    if not layers:
        return {}
    aug, reads = _augmented(model, layers, method)
    nodes = {n.name: n for n in model.graph.node}
    return {layer.node: _shift(layer, total / count, method, nodes)
            for layer, (total, count) in zip(layers, _sums(aug, reads, calibration))}


def _augmented(model, layers: list[Layer], method: str):
    """A copy of `model` whose outputs are, per layer, the channel means `output_shifts` reads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    graph, opset = aug.graph, _opset(aug)
    taken = {t for n in graph.node for t in (*n.input, *n.output)} | {t.name for t in graph.initializer} | {
        i.name for i in graph.input}
    nodes = {n.name: n for n in graph.node}

    def fresh(base: str) -> str:
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    def const(base: str, value: np.ndarray) -> str:
        name = fresh(base)
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def mean(tensor: str, axes: list[int], base: str) -> str:
        out = fresh(base)
        if opset >= 18:
            graph.node.append(helper.make_node("ReduceMean", [tensor, const(f"{base}/axes", np.array(axes, np.int64))],
                                               [out], keepdims=0))
        else:
            graph.node.append(helper.make_node("ReduceMean", [tensor], [out], axes=axes, keepdims=0))
        return out

    del graph.output[:]
    reads = []
    for i, layer in enumerate(layers):
        base, x = f"bias_correction/{i}", layer.input
        if layer.op == "Conv":
            spatial = list(range(2, layer.delta.ndim))
            if method == "empirical":
                conv, shifted = nodes[layer.node], fresh(f"{base}/shift")
                graph.node.append(helper.make_node("Conv", [x, const(f"{base}/delta", layer.delta.astype(np.float32))],
                                                   [shifted], name=fresh(f"{base}/conv")))
                graph.node[-1].attribute.extend(conv.attribute)
                out = mean(shifted, [0, *spatial], f"{base}/mean")
            else:
                out = mean(x, [0, *spatial], f"{base}/mean")
        elif layer.op == "Gemm":
            out = mean(x, [0], f"{base}/mean")
        else:
            flat = fresh(f"{base}/flat")
            k = layer.delta.shape[0]
            graph.node.append(helper.make_node("Reshape", [x, const(f"{base}/shape", np.array([-1, k], np.int64))],
                                               [flat]))
            out = mean(flat, [0], f"{base}/mean")
        graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
        reads.append(out)
    return aug, reads


def _sums(aug, reads: list[str], calibration: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
    """Per output of `aug`, its sum over the calibration samples (float64) and the sample count."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(aug.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    sums, count = [None] * len(reads), 0
    for batch in calibration:
        got = sess.run(reads, {feed: batch})
        sums = [g.astype(np.float64) * len(batch) + (0.0 if s is None else s) for g, s in zip(got, sums)]
        count += len(batch)
    return [(total, count) for total in sums]


def _shift(layer: Layer, m: np.ndarray, method: str, nodes: dict) -> np.ndarray:
    """A layer's output shift per channel from its channel means `m`."""
    d = layer.delta.astype(np.float64)
    if layer.op == "Conv" and method == "empirical":
        return m
    if layer.op == "Conv":  # (W_q - W) summed over the taps, times the channel means, per group
        per_group = d.shape[1]
        groups = m.size // per_group
        taps = d.reshape(groups, d.shape[0] // groups, per_group, -1).sum(axis=3)
        return np.einsum("goi,gi->go", taps, m.reshape(groups, per_group)).reshape(-1)
    if layer.op == "Gemm":
        transposed = {a.name: a.i for a in nodes[layer.node].attribute}.get("transB", 0)
        return d @ m if transposed else m @ d
    return m @ d


def apply_corrections(model, layers: list[Layer], shifts: dict[str, np.ndarray]) -> dict[str, dict]:
    """Subtract each layer's output shift from its bias in `model` (in place); a Conv or Gemm without a
    bias gets one. Returns, per layer, the largest |correction| and that relative to the largest |bias|."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    taken = {t for n in graph.node for t in (*n.input, *n.output)} | set(inits) | {i.name for i in graph.input}
    done = {}
    for layer in layers:
        correction = shifts[layer.node] * layer.to_bias
        if layer.bias is not None:
            old = numpy_helper.to_array(inits[layer.bias])
            new = (old.astype(np.float64) - correction.reshape(old.shape)).astype(np.float32)
            inits[layer.bias].CopyFrom(numpy_helper.from_array(new, layer.bias))
            largest = float(np.abs(old).max())
        else:
            name = f"{layer.weight}_bias"
            while name in taken:
                name += "_"
            taken.add(name)
            graph.initializer.append(numpy_helper.from_array((-correction).astype(np.float32), name))
            node = nodes[layer.node]
            if len(node.input) > 2:  # an empty optional input
                node.input[2] = name
            else:
                node.input.append(name)
            largest = 0.0
        top = float(np.abs(correction).max())
        done[layer.node] = {"op": layer.op, "max_abs": top, "relative": top / largest if largest > 0 else None,
                            "new_bias": layer.bias is None}
    return done


def _same_layer(original, prepared, layer: Layer, ref_weights: dict) -> bool:
    """`layer` of the prepared graph is the node of the same name in `original` with the same weights (as
    cropped) and the same bias: onnxruntime's pre-processing left it alone."""
    from onnx import numpy_helper

    node = next((n for n in original.graph.node if n.name == layer.node and n.op_type == layer.op), None)
    if node is None or list(node.input[:2]) != [layer.input, layer.weight] or layer.weight not in ref_weights:
        return False
    pre = {t.name: t for t in prepared.graph.initializer}
    if not np.array_equal(ref_weights[layer.weight], numpy_helper.to_array(pre[layer.weight])):
        return False
    inits = {t.name: t for t in original.graph.initializer}
    if layer.op == "MatMul":
        add = next((n for n in original.graph.node if n.name == layer.add), None)
        if add is None or node.output[0] not in add.input or layer.bias not in add.input:
            return False
    elif (node.input[2] if len(node.input) > 2 and node.input[2] else None) != layer.bias:
        return False
    return layer.bias is None or (layer.bias in inits and np.array_equal(
        numpy_helper.to_array(inits[layer.bias]), numpy_helper.to_array(pre[layer.bias])))


def correct_prepared(pre_path: Path, out_path: Path, calibration: list[np.ndarray], cfg: QDQConfig,
                     method: str = DEFAULT_METHOD) -> dict:
    """`correct_biases` on a graph already as quantize_static is handed it (`QDQBuilder.prepared(cfg)`)."""
    import onnx

    model = onnx.load(str(pre_path))
    layers, skipped = find_layers(model, cfg)
    done = apply_corrections(model, layers, output_shifts(model, layers, calibration, method))
    onnx.save(model, str(out_path))
    return _record(done, skipped, calibration, cfg, method)


def correct_biases(fp32_path: Path, out_path: Path, calibration: list[np.ndarray], cfg: QDQConfig = QDQConfig(),
                   method: str = DEFAULT_METHOD) -> dict:
    """fp32 ONNX -> the same fp32 ONNX with each int8-weight layer's bias corrected by the mean shift of its
    output over the calibration samples (see the module docstring); the record of what was corrected.

    The shifts are measured on the graph quantize_static will be handed under `cfg` (the padding crop
    changes which weights are quantized together) and written back to the same nodes of `fp32_path`; a
    layer that onnxruntime's pre-processing changes (say, a BatchNormalization folded into it) is skipped
    and named. Quantizing the output with `quantize_onnx(..., cfg)` gives int8 weights whose layer means
    are the fp32 layers' on the calibration samples."""
    import onnx

    from edgeq.onnx_quant import QDQBuilder, _cropped

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as work:
        prepared = onnx.load(str(QDQBuilder(fp32_path, Path(work)).prepared(cfg)))
    layers, skipped = find_layers(prepared, cfg)
    original = onnx.load(str(fp32_path))
    cropped = _cropped(fp32_path) if cfg.crop_padding else None
    reference = onnx.load_from_string(cropped) if cropped is not None else original
    ref_weights = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    kept = []
    for layer in layers:
        if _same_layer(original, prepared, layer, ref_weights):
            kept.append(layer)
        else:
            skipped[layer.node] = "changed by onnxruntime's pre-processing"
    done = apply_corrections(original, kept, output_shifts(prepared, kept, calibration, method))
    onnx.save(original, str(out_path))
    check_onnx(out_path)
    return _record(done, skipped, calibration, cfg, method)


def _record(done: dict[str, dict], skipped: dict[str, str], calibration: list[np.ndarray], cfg: QDQConfig,
            method: str) -> dict:
    relative = {k: v["relative"] for k, v in done.items() if v["relative"] is not None}
    worst = max(relative, key=relative.get) if relative else None
    return {
        "method": method,
        "computed": ("mean over samples and positions of conv(x, W_q - W) (Gemm/MatMul: (W_q - W) E[x]), x the "
                     "fp32 input" if method == "empirical" else
                     "(W_q - W) summed over kernel taps, times the per-channel mean E[x] of the fp32 input"),
        "samples": int(sum(len(b) for b in calibration)),
        "weights": {"type": "int8", "symmetric": True, "per_channel": cfg.per_channel, "reduce_range": cfg.reduce_range},
        "layers": sorted(done),
        "skipped": dict(sorted(skipped.items())),
        "largest_relative": {"node": worst, "value": round(relative[worst], 6)} if worst else None,
        "per_layer": done,
    }
