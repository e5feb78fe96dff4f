"""The int8 ONNX graph edgeq ships: exact rewrites, what onnxruntime runs, and the measured search."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from edgeq.data import Arrays, batches, sample
from edgeq.export import QDQConfig, export_onnx, float_outputs, quantize_onnx, relu_before_maxpool
from edgeq.examples.mnist import CNN, Preprocessing, load_data
from edgeq.precision import SearchConfig, _better, compute_nodes, inspect_runtime_graph, optimized_ops, search_precision
from edgeq.runtime import load_onnx
from edgeq.recipe import Finetune
from edgeq.train import fit
from edgeq.verify.measure import sqnr_db

PRE = Preprocessing()
FAST = SearchConfig(batches=(1, 64), rounds=3, window_s=0.01)


@pytest.fixture(scope="module")
def ds():
    return load_data()


@pytest.fixture(scope="module")
def calib(ds):
    return batches(sample(Arrays(PRE.apply(ds.train.images), ds.train.labels), 256, seed=0))


@pytest.fixture(scope="module")
def test_x(ds):
    return PRE.apply(ds.test.images)


@pytest.fixture(scope="module")
def cnn_onnx(ds, tmp_path_factory):
    """A CNN of another width than the default, trained briefly: the code must not depend on names or sizes."""
    torch.manual_seed(0)
    train = Arrays(PRE.apply(ds.train.images), ds.train.labels)
    model = fit(CNN(channels=(12, 24), hidden=64), train, Finetune(epochs=1, lr=3e-3, shift=2), progress=False)
    return export_onnx(model, tmp_path_factory.mktemp("cnn") / "cnn.onnx", torch.zeros(1, 1, 28, 28))


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_relu_before_maxpool_is_exact_and_leaves_fp32_convs_alone(cnn_onnx, test_x, tmp_path):
    first_conv = compute_nodes(cnn_onnx)[0][0]
    model = onnx.load(str(cnn_onnx))
    assert relu_before_maxpool(model, skip={first_conv}) == 1
    ops = _ops(model)
    assert ops[:4] == ["Conv", "MaxPool", "Relu", "Conv"] and ops[4:6] == ["Relu", "MaxPool"]
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / "reordered.onnx"))
    before = load_onnx(cnn_onnx).run(test_x[:200])
    after = load_onnx(tmp_path / "reordered.onnx").run(test_x[:200])
    assert np.array_equal(before, after)  # max and relu commute: bit for bit the same logits
    assert relu_before_maxpool(onnx.load(str(cnn_onnx))) == 2


def test_int8_conv_block_runs_fused_in_uint8_without_stray_qdq(cnn_onnx, calib, tmp_path):
    first_conv = compute_nodes(cnn_onnx)[0][0]
    ops = optimized_ops(quantize_onnx(cnn_onnx, tmp_path / "q.onnx", calib, QDQConfig(exclude_nodes=(first_conv,))))
    # fp32 conv1 block -> one QuantizeLinear -> conv2+relu as QLinearConv, pooled in uint8 NHWC ->
    # QGemm, QGemm writing float logits: no Relu, no fp32 pool or DequantizeLinear after conv2
    assert ops["QLinearConv"] == 1 and ops["NhwcMaxPool"] == 1 and ops["QGemm"] == 2
    assert ops["QuantizeLinear"] == 1 and "DequantizeLinear" not in ops and "Relu" not in ops
    plain = optimized_ops(quantize_onnx(cnn_onnx, tmp_path / "p.onnx", calib,
                                        QDQConfig(exclude_nodes=(first_conv,), relu_before_pool=False,
                                                  float_outputs=False)))
    assert plain.get("DequantizeLinear", 0) >= 2 and "NhwcMaxPool" not in plain


def test_runtime_graph_inspection_catches_a_uint8_pool_outside_nhwc(cnn_onnx, calib, tmp_path):
    first_conv = compute_nodes(cnn_onnx)[0][0]
    good = inspect_runtime_graph(quantize_onnx(cnn_onnx, tmp_path / "g.onnx", calib,
                                               QDQConfig(exclude_nodes=(first_conv,))))
    assert good["clean"] and good["dequantize_nodes"] == []
    # relu moved before the pool of the fp32 conv too: onnxruntime then hoists the QuantizeLinear
    # above that pool and pools uint8 in NCHW, the slow generic kernel
    model = onnx.load(str(cnn_onnx))
    relu_before_maxpool(model)
    onnx.save(model, str(tmp_path / "all.onnx"))
    bad = inspect_runtime_graph(quantize_onnx(tmp_path / "all.onnx", tmp_path / "b.onnx", calib,
                                              QDQConfig(exclude_nodes=(first_conv,), relu_before_pool=False)))
    assert not bad["clean"] and len(bad["uint8_pools_nchw"]) == 1
    plain = inspect_runtime_graph(quantize_onnx(cnn_onnx, tmp_path / "p.onnx", calib,
                                                QDQConfig(exclude_nodes=(first_conv,), relu_before_pool=False,
                                                          float_outputs=False)))
    assert len(plain["dequantize_nodes"]) >= 2  # back to fp32 to pool, and again for the logits


def test_float_outputs_keep_logits_closer_to_fp32(cnn_onnx, calib, test_x, tmp_path):
    ref = load_onnx(cnn_onnx).run(test_x)
    sqnr = {}
    for flag in (True, False):
        path = quantize_onnx(cnn_onnx, tmp_path / f"{flag}.onnx", calib, QDQConfig(float_outputs=flag))
        model = onnx.load(str(path))
        producer = {o: n.op_type for n in model.graph.node for o in n.output}
        assert (producer[model.graph.output[0].name] == "Gemm") is flag
        sqnr[flag] = sqnr_db(ref, load_onnx(path).run(test_x))
    assert sqnr[True] > sqnr[False] + 1.0, sqnr  # the uint8 rounding of the logits is gone


def test_float_outputs_on_an_fp32_graph_changes_nothing(cnn_onnx):
    assert float_outputs(onnx.load(str(cnn_onnx))) == 0


def _qdq_tail(outputs: list[str]) -> onnx.ModelProto:
    """x -> Relu -> a -> QuantizeLinear -> DequantizeLinear -> y, with the given graph outputs."""
    h, tp = onnx.helper, onnx.TensorProto
    nodes = [h.make_node("Relu", ["x"], ["a"]), h.make_node("QuantizeLinear", ["a", "s", "z"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(0, np.uint8), "z")]
    graph = h.make_graph(nodes, "tail", [h.make_tensor_value_info("x", tp.FLOAT, [1, 4])],
                         [h.make_tensor_value_info(o, tp.FLOAT, [1, 4]) for o in outputs], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_float_outputs_removes_the_pair_and_its_constants_and_nothing_that_is_read_elsewhere():
    model = _qdq_tail(["y"])
    assert float_outputs(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Relu"] and not model.graph.initializer
    both = _qdq_tail(["y", "a"])  # the tensor before the pair is itself an output: removing would orphan it
    assert float_outputs(both) == 0 and len(both.graph.node) == 3


def test_fp32_layer_decision_rule():
    g = 0.03
    # faster at every batch size
    assert _better({"best": {1: 0.8, 256: 0.9}, "cand": {1: 0.7, 256: 0.8}, "cand_vs_best": {1: 0.88, 256: 0.9}}, g)
    # faster at one size, slower at the other, while int8 already beats fp32: noise, rejected
    assert not _better({"best": {1: 0.8, 256: 0.9}, "cand": {1: 0.7, 256: 0.95},
                        "cand_vs_best": {1: 0.88, 256: 1.02}}, g)
    # int8 slower than fp32 at batch 1; the candidate fixes it and costs <=3% at 256, still below fp32
    assert _better({"best": {1: 1.10, 256: 0.9}, "cand": {1: 0.95, 256: 0.92},
                    "cand_vs_best": {1: 0.86, 256: 1.02}}, g)
    # the same fix, but it would make batch 256 slower than fp32: rejected
    assert not _better({"best": {1: 1.10, 256: 0.99}, "cand": {1: 0.95, 256: 1.01},
                        "cand_vs_best": {1: 0.86, 256: 1.02}}, g)
    # the same fix at a clear cost (>3%) elsewhere: rejected
    assert not _better({"best": {1: 1.10, 256: 0.8}, "cand": {1: 0.95, 256: 0.85},
                        "cand_vs_best": {1: 0.86, 256: 1.06}}, g)


@pytest.mark.parametrize("threads", [1, 2])
def test_search_decides_every_layer_and_the_weight_scales_by_measurement(cnn_onnx, calib, ds, threads):
    check = PRE.apply(ds.train.images[:512])
    plan = search_precision(cnn_onnx, calib, check, replace(FAST, threads=threads))
    assert [d["node"] for d in plan.layers] == [n for n, _ in compute_nodes(cnn_onnx)]
    for d in plan.layers:
        assert d["precision"] in ("fp32", "int8") and d["reason"]
        assert set(d["with_node_fp32_over_int8"]) == {"1", "64"}
        assert all(r > 0 for r in d["int8_over_fp32_parent"].values())
    assert plan.qdq.exclude_nodes == tuple(d["node"] for d in plan.layers if d["precision"] == "fp32")
    w = plan.weights
    assert w["chosen"] == ("per-channel" if plan.qdq.per_channel else "per-tensor") and w["reason"]
    if len(plan.qdq.exclude_nodes) < len(plan.layers):
        assert 0.9 < w["agreement_with_fp32"]["per_channel"] <= 1.0
        assert w["agreement_images"] == "512 training images"
