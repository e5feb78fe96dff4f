"""Bias correction (edgeq.bias): the int8 weights it assumes are the ones onnxruntime writes, a corrected
layer's int8 mean is its fp32 mean, only biases change, and on a trained CNN its effect is reported."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.bias import correct_biases, find_layers
from edgeq.data import batches, sample
from edgeq.onnx_quant import QDQBuilder, QDQConfig, WeightMemo, quantize_onnx
from edgeq.runtime import INPUT_NAME, OUTPUT_NAME, load_onnx

X86, ARM64 = QDQConfig(), QDQConfig(activations="int8", reduce_range=False)
CONFIGS = {"x86": X86, "arm64": ARM64, "per-tensor": replace(X86, per_channel=False)}


SHAPES = {"Conv": (4, 16, 6, 6), "Gemm": (4, 64), "MatMul": (4, 3, 64)}  # calibration batches


def one_layer(path: Path, op: str, cfg: QDQConfig, seed: int = 0) -> Path:
    """A single Conv (3x3, padding 1, with a bias), Gemm (no bias, alpha 0.5) or MatMul + Add (a linear layer on a
    sequence) whose weights sit 0.45 of a step above an int8 level under `cfg`: each output channel's
    largest weight is 1.0, so its scale is 1/qmax and rounding moves every other weight down by 0.45
    steps, all the same way."""
    rng = np.random.default_rng(seed)
    qmax = 64 if cfg.reduce_range else 127
    shape = (8, 16, 3, 3) if op == "Conv" else (8, 64)
    x_shape = ["batch", *SHAPES[op][1:]]
    y_shape = {"Conv": ["batch", 8, 6, 6], "Gemm": ["batch", 8], "MatMul": ["batch", 3, 8]}[op]
    w = ((rng.integers(-qmax + 1, qmax - 1, size=shape) + 0.45) / qmax).astype(np.float32)
    w.reshape(shape[0], -1)[:, 0] = 1.0
    b = numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b")
    if op == "Conv":
        nodes = [helper.make_node("Conv", [INPUT_NAME, "w", "b"], [OUTPUT_NAME], name="layer", pads=[1, 1, 1, 1],
                                  kernel_shape=[3, 3])]
    elif op == "Gemm":
        nodes, b = [helper.make_node("Gemm", [INPUT_NAME, "w"], [OUTPUT_NAME], name="layer", transB=1, alpha=0.5)], None
    else:
        w = np.ascontiguousarray(w.T)
        nodes = [helper.make_node("MatMul", [INPUT_NAME, "w"], ["y"], name="layer"),
                 helper.make_node("Add", ["y", "b"], [OUTPUT_NAME], name="bias")]
    inits = [numpy_helper.from_array(w, "w")] + ([b] if b is not None else [])
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, y_shape)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
@pytest.mark.parametrize("target", ["x86", "arm64"])
def test_corrected_int8_layer_has_the_fp32_mean(op, target, tmp_path):
    cfg = CONFIGS[target]
    fp32 = one_layer(tmp_path / "fp32.onnx", op, cfg)
    calibration = [np.full(SHAPES[op], 0.7, np.float32)] * 2  # constant: int8 represents it exactly
    record = correct_biases(fp32, tmp_path / "corrected.onnx", calibration, cfg)
    assert record["layers"] == ["layer"] and record["per_layer"]["layer"]["new_bias"] == (op == "Gemm")
    x = calibration[0]
    axes = (0, 2, 3) if op == "Conv" else (0,)

    # the arm64 format (S8S8) run unfused: fused, x86 runs it through U8S8 kernels whose pair sums saturate
    # on a CPU without VNNI, which ARM's kernels never do (edgeq.runtime.golden_options)
    options = {"graph_optimization_level": "ORT_ENABLE_BASIC"} if target == "arm64" else None

    def mean(path: Path) -> np.ndarray:
        return load_onnx(path, 1, options).run(x).astype(np.float64).mean(axis=axes)

    ref = mean(fp32)
    plain = mean(quantize_onnx(fp32, tmp_path / "plain.onnx", calibration, cfg))
    fixed = mean(quantize_onnx(tmp_path / "corrected.onnx", tmp_path / "fixed.onnx", calibration, cfg))
    hooked = mean(quantize_onnx(fp32, tmp_path / "hooked.onnx", calibration, replace(cfg, bias_correction=True)))
    assert np.abs(plain - ref).min() > 0.05  # every channel's mean moved by the rounding
    np.testing.assert_allclose(fixed, ref, atol=2e-3)  # borders and all (padding 1): the measured shift
    np.testing.assert_allclose(hooked, ref, atol=2e-3)


def test_matmul_bias_is_corrected_in_its_add(tmp_path):
    """A MatMul + Add's correction lands in the Add's constant. Not compared at the int8 output: there
    onnxruntime rounds the MatMul output and the Add's constant to 8 bits per tensor, steps larger than the
    correction."""
    fp32 = one_layer(tmp_path / "fp32.onnx", "MatMul", X86)
    rng = np.random.default_rng(0)
    calibration = [rng.normal(0.5, 1.0, size=SHAPES["MatMul"]).astype(np.float32) for _ in range(3)]
    correct_biases(fp32, tmp_path / "corrected.onnx", calibration, X86)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp32)).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "corrected.onnx")).graph.initializer}
    shipped = dequantized_weights(quantize_onnx(fp32, tmp_path / "int8.onnx", calibration, X86))
    mean_x = np.concatenate(calibration).reshape(-1, 64).astype(np.float64).mean(axis=0)
    expected = before["b"] - mean_x @ (shipped["w"].astype(np.float64) - before["w"])
    np.testing.assert_allclose(after["b"], expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(after["w"], before["w"])

    lone = onnx.load(str(fp32))  # without its Add, a MatMul has no bias to correct
    lone.graph.node[0].output[0] = OUTPUT_NAME
    del lone.graph.node[1]
    del lone.graph.initializer[1]
    onnx.save(lone, str(tmp_path / "lone.onnx"))
    record = correct_biases(tmp_path / "lone.onnx", tmp_path / "lone-corrected.onnx", calibration, X86)
    assert record["layers"] == [] and record["skipped"] == {"layer": "no Add of a constant bias"}


@pytest.fixture(scope="module")
def digits():
    from edgeq.examples import mnist

    return mnist.splits(mnist.load_data())


@pytest.fixture(scope="module")
def cnn(digits, tmp_path_factory):
    """The example CNN trained for one epoch, as an fp32 ONNX file."""
    import torch

    from edgeq.examples import mnist
    from edgeq.export import export_onnx

    train = digits[0]
    model = mnist.train_model("cnn", train, epochs=1, progress=False)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    return export_onnx(model, path, torch.from_numpy(np.array(train.x[:1])))


@pytest.fixture(scope="module")
def calibration(digits):
    return batches(sample(digits[0], 512, seed=0))


def cropped_model(path: Path) -> Path:
    """A Conv (3x3, padding 1) on a 1x1 map, then a Gemm: edgeq's padding crop leaves one tap of 9."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=(12, 8, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.normal(size=12).astype(np.float32), "cb"),
             numpy_helper.from_array(rng.normal(size=(10, 12)).astype(np.float32), "gw"),
             numpy_helper.from_array(rng.normal(size=10).astype(np.float32), "gb")]
    nodes = [helper.make_node("Conv", [INPUT_NAME, "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "gw", "gb"], [OUTPUT_NAME], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "crop", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                                                            ["batch", 8, 1, 1])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def dequantized_weights(path: Path) -> dict[str, np.ndarray]:
    """The int8 weights of a QDQ file, dequantized, by the name of the fp32 weight they replace."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        q = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and q is not None and q.dtype == np.int8:
            scale, zero = inits[node.input[1]], inits[node.input[2]]
            shape = [1] * q.ndim
            if scale.ndim:  # per channel, along `axis` (1 unless given)
                shape[{a.name: a.i for a in node.attribute}.get("axis", 1)] = -1
            out[node.input[0].removesuffix("_quantized")] = (
                (q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.reshape(shape))
    return out


@pytest.mark.parametrize("target", list(CONFIGS))
@pytest.mark.parametrize("which", ["cnn", "cropped"])
def test_assumed_int8_weights_are_the_files(which, target, cnn, calibration, tmp_path):
    cfg = CONFIGS[target]
    if which == "cnn":
        fp32, calib = cnn, calibration[:2]
    else:
        fp32, calib = cropped_model(tmp_path / "crop.onnx"), [np.random.default_rng(0).normal(size=(8, 8, 1, 1))
                                                              .astype(np.float32)]
    prepared = onnx.load(str(QDQBuilder(fp32, tmp_path).prepared(cfg)))
    weights = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}
    layers, skipped = find_layers(prepared, cfg)
    assert len(layers) == (4 if which == "cnn" else 2) and not skipped
    shipped = dequantized_weights(quantize_onnx(fp32, tmp_path / "int8.onnx", calib, cfg))
    for layer in layers:
        assert np.array_equal(shipped[layer.weight], weights[layer.weight] + layer.delta), layer.node
    if which == "cropped":
        assert shipped["cw"].shape == (12, 8, 1, 1)  # the crop's kernel, quantized over its one tap


def test_only_biases_change(cnn, calibration, tmp_path):
    first_conv = next(n.name for n in onnx.load(str(cnn)).graph.node if n.op_type == "Conv")
    cfg = replace(X86, exclude_nodes=(first_conv,))
    record = correct_biases(cnn, tmp_path / "corrected.onnx", calibration, cfg)
    before, after = onnx.load(str(cnn)), onnx.load(str(tmp_path / "corrected.onnx"))
    assert [n.SerializeToString() for n in before.graph.node] == [n.SerializeToString() for n in after.graph.node]
    assert before.graph.input == after.graph.input and before.graph.output == after.graph.output
    biases = {n.input[2]: n.name for n in before.graph.node if n.op_type in ("Conv", "Gemm")}
    assert [t.name for t in before.graph.initializer] == [t.name for t in after.graph.initializer]
    changed = set()
    for old, new in zip(before.graph.initializer, after.graph.initializer):
        if old.SerializeToString() != new.SerializeToString():
            assert old.name in biases and list(old.dims) == list(new.dims) and old.data_type == new.data_type
            changed.add(biases[old.name])
    assert changed == set(record["layers"]) == set(biases.values()) - {first_conv}
    assert record["skipped"] == {first_conv: "kept fp32"} and record["largest_relative"]["value"] > 0


def test_trained_cnn_with_and_without_correction(cnn, calibration, digits, tmp_path, capsys):
    """Reported, not asserted: whether correction helps is measured (benchmarks/bias.py), not assumed."""
    from collections import Counter

    from edgeq.metrics import score

    val = digits[1]
    ref = load_onnx(cnn).predict(val.x)
    lines = []
    for target in ("x86", "arm64"):
        cfg = CONFIGS[target]
        plain = quantize_onnx(cnn, tmp_path / f"{target}.onnx", calibration, cfg)
        fixed = quantize_onnx(cnn, tmp_path / f"{target}-bc.onnx", calibration, replace(cfg, bias_correction=True))
        ops = [Counter(n.op_type for n in onnx.load(str(p)).graph.node) for p in (plain, fixed)]
        assert ops[0] == ops[1]  # the same int8 graph: only the bias values differ
        assert dequantized_weights(plain).keys() == dequantized_weights(fixed).keys()
        for name, w in dequantized_weights(plain).items():
            assert np.array_equal(w, dequantized_weights(fixed)[name])
        for label, path in (("plain", plain), ("corrected", fixed)):
            logits = load_onnx(path).predict(val.x)
            assert np.isfinite(logits).all()
            s = score(logits, val.y, ref)
            lines.append(f"{target:6s} {label:9s} accuracy {s['accuracy']:.4f} agreement {s['agreement']:.4f} "
                         f"sqnr {s['sqnr_db']} dB")
    with capsys.disabled():
        print("\nMNIST CNN (1 epoch), validation split, int8 vs fp32:\n" + "\n".join(lines))


def test_off_is_the_default_and_on_is_recorded():
    assert QDQConfig().bias_correction is False and "bias_correction" not in QDQConfig().describe()
    assert QDQConfig(bias_correction=True).describe()["bias_correction"] is True


def test_entropy_calibration_is_not_minmax(tmp_path):
    """onnxruntime's Entropy calibrator with its default bins has one threshold to try, the whole range: MinMax's
    ranges under another name. edgeq's Entropy searches a 2048-bin histogram, so a rare outlier is clipped."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    fp32 = one_layer(tmp_path / "fp32.onnx", "Gemm", X86)
    x = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    x[0, 0] = 60.0  # one value in 16,384, far out
    builder = QDQBuilder(fp32, tmp_path)
    pre = builder.prepared(X86)
    ranges = {m: load_tensors_data(builder.ranges(pre, batches(x, 64), m)).data[INPUT_NAME].range_value
              for m in ("MinMax", "Entropy")}
    lo, hi = (float(np.asarray(v).ravel()[0]) for v in ranges["MinMax"])
    assert (lo, hi) == (float(x.min()), 60.0)
    e_lo, e_hi = (float(np.asarray(v).ravel()[0]) for v in ranges["Entropy"])
    assert lo <= e_lo and e_hi < hi / 2  # the outlier is left out of the int8 range



def test_a_builder_quantizes_each_weight_once_and_writes_the_bytes_onnxruntime_writes_alone(cnn, calibration, tmp_path,
                                                                                          monkeypatch):
    """Every trial of a parent quantizes the same weights: a builder computes each weight's scales and int8
    values once (WeightMemo), and each file is the bytes onnxruntime's quantizer writes without the memo."""
    import contextlib

    first_conv = next(n.name for n in onnx.load(str(cnn)).graph.node if n.op_type == "Conv")
    settings = [X86, replace(X86, exclude_nodes=(first_conv,)), ARM64, replace(X86, reduce_range=not X86.reduce_range),
                replace(X86, per_channel=False), replace(X86, bias_correction=True)]
    (tmp_path / "shared").mkdir()
    builder = QDQBuilder(cnn, tmp_path / "shared")
    built, counts = [], []
    for i, cfg in enumerate(settings):
        built.append(builder.build(tmp_path / f"shared-{i}.onnx", calibration[:2], cfg).read_bytes())
        counts.append((builder.weights.misses, builder.weights.hits))
    (m0, h0), (m1, h1), (m2, h2), (m3, h3), (m4, h4), (m5, h5) = counts
    assert m0 > 0 and m1 == m0 and h1 > h0  # one layer fewer in int8: nothing computed again
    assert m2 > m1  # ARM64's weights (no reduce_range): computed for themselves
    assert m3 == m2 and h3 > h2  # x86 without reduce_range has ARM64's int8 weights (its activations differ)
    assert (m4, h4) == (m3, h3)  # per-tensor: onnxruntime's quantizer alone
    assert m5 == m4 and h5 > h4  # bias correction changes biases only
    monkeypatch.setattr(WeightMemo, "installed", lambda self: contextlib.nullcontext())
    for i, cfg in enumerate(settings):
        (tmp_path / f"alone-{i}").mkdir()
        alone = QDQBuilder(cnn, tmp_path / f"alone-{i}").build(tmp_path / f"alone-{i}.onnx", calibration[:2], cfg)
        assert alone.read_bytes() == built[i], cfg
