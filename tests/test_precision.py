"""The int8 ONNX graph edgeq ships: exact rewrites, what onnxruntime runs, and the measured search."""

import math
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from edgeq.data import Arrays, batches, sample
from edgeq.export import export_onnx
from edgeq.onnx_quant import QDQConfig, float_outputs, quantize_onnx, relu_before_maxpool
from edgeq.examples.mnist import CNN, Preprocessing, load_data
from edgeq.evidence import Evidence, Rule, decide, median_interval, slower_verdict
from edgeq.precision import (SearchConfig, compute_nodes, fp32_could_win, inspect_runtime_graph, layer_verdict,
                             optimized_ops, per_tensor_verdict, search_precision)
from edgeq.runtime import load_onnx
from edgeq.recipe import Finetune
from edgeq.train import fit
from edgeq.metrics import sqnr_db

PRE = Preprocessing()
FAST = SearchConfig(batches=(1, 64), rule=Rule(confidence=0.8, block_rounds=4, max_blocks=2), window_s=0.01)


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
    assert len(relu_before_maxpool(model, skip={first_conv})) == 1
    ops = _ops(model)
    assert ops[:4] == ["Conv", "MaxPool", "Relu", "Conv"] and ops[4:6] == ["Relu", "MaxPool"]
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / "reordered.onnx"))
    before = load_onnx(cnn_onnx).run(test_x[:200])
    after = load_onnx(tmp_path / "reordered.onnx").run(test_x[:200])
    assert np.array_equal(before, after)  # max and relu commute: bit for bit the same logits
    assert len(relu_before_maxpool(onnx.load(str(cnn_onnx)))) == 2


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


def _evidence(ratios: dict, point: bool = False) -> Evidence:
    """Evidence whose every round shows the given ratio, spread by +-1% (a quiet machine)."""
    e = Evidence(point=point)
    e.add({k: [v * f for f in (0.99, 1.0, 1.01, 1.0, 0.995, 1.005, 1.0, 1.0)] for k, v in ratios.items()})
    return e


def _three(best: dict, cand: dict, vs: dict) -> dict:
    return {**{("best", b): r for b, r in best.items()}, **{("cand", b): r for b, r in cand.items()},
            **{("cand_vs_best", b): r for b, r in vs.items()}}


def test_fp32_layer_decision_rule():
    v = layer_verdict((1, 256), 0.03)
    # faster at every batch size
    assert v(_evidence(_three({1: 0.8, 256: 0.9}, {1: 0.7, 256: 0.8}, {1: 0.88, 256: 0.9}))) is True
    # faster at one size, slower at the other, while int8 already beats fp32: noise, ruled out
    assert v(_evidence(_three({1: 0.8, 256: 0.9}, {1: 0.7, 256: 0.95}, {1: 0.88, 256: 1.05}))) is False
    # int8 slower than fp32 at batch 1; the candidate fixes it and costs <=3% at 256, still below fp32
    assert v(_evidence(_three({1: 1.10, 256: 0.9}, {1: 0.95, 256: 0.92}, {1: 0.86, 256: 1.015}))) is True
    # the same fix, but it would make batch 256 slower than fp32: not a departure
    assert not v(_evidence(_three({1: 1.10, 256: 0.99}, {1: 0.95, 256: 1.05}, {1: 0.86, 256: 1.02})))
    # the same fix at a clear cost (>3%) elsewhere: not a departure
    assert not v(_evidence(_three({1: 1.10, 256: 0.8}, {1: 0.95, 256: 0.85}, {1: 0.86, 256: 1.06})))


def test_median_interval_is_distribution_free_and_widens_with_confidence():
    xs = [float(i) for i in range(1, 9)]
    assert median_interval(xs, 0.99) == (1.0, 8.0)  # n=8: [min, max] covers 1 - 2/256 = 99.2%
    assert median_interval(xs, 0.90) == (2.0, 7.0)  # [x2, x7] covers 1 - 2*9/256 = 93.0%
    assert median_interval(xs[:5], 0.99) == (-math.inf, math.inf)  # 5 rounds cannot give 99%: no evidence yet
    lo, hi = median_interval([float(i) for i in range(32)], 0.99)
    assert 0 < lo < 15.5 < hi < 31  # more rounds: a narrower interval, still around the median


def test_one_block_under_load_never_departs_and_a_confirmed_one_does():
    rule = Rule(confidence=0.99, block_rounds=8, max_blocks=4)
    limit = 1.05

    def slower(e: Evidence):
        return True if e.lo(1) > limit else False if e.hi(1) <= limit else None

    def blocks(*medians):
        it = iter(medians)

        def block(n: int) -> dict:
            m = next(it)
            return {1: [m * f for f in np.linspace(0.98, 1.02, n)]}

        return block

    burst = decide(blocks(1.30, 0.80, 0.80, 0.80), slower, rule)  # one slow block, then quiet
    assert not burst.depart and burst.settled == "ruled out"  # the burst costs blocks, not the file
    real = decide(blocks(1.30, 1.25), slower, rule)  # slower, and re-measured slower
    assert real.depart and real.blocks == 2 and real.settled == "departed"
    assert real.summary()["ratios"]["1"]["rounds"] == 16
    quiet = decide(blocks(0.80), slower, rule)  # clearly within the limit: one block settles it
    assert not quiet.depart and quiet.blocks == 1
    close = decide(lambda n: {1: list(np.linspace(0.95, 1.15, n))}, slower, rule)  # straddles the limit
    assert not close.depart and close.blocks == 4 and close.settled.startswith("undecided")


def _stream(blocks: list[dict]):
    it = iter(blocks)
    return lambda rounds: next(it)


def test_no_block_is_taken_that_cannot_change_the_decision():
    rule = Rule(confidence=0.99, block_rounds=8, max_blocks=4)
    slower = slower_verdict((1,))
    unmarked = lambda e: slower(e)  # noqa: E731 the same rule, never cut short
    straddles = {1: list(np.linspace(0.95, 1.15, 8))}  # within the noise margin of its parent, give or take
    cut = decide(_stream([straddles] * 4), slower, rule)
    assert not cut.depart and cut.settled == "cannot depart" and cut.blocks == 3
    # the block it did not take could not have changed it: not even one as slow as a block can be
    assert not decide(_stream([straddles] * 3 + [{1: [1e6] * 8}]), unmarked, rule).depart
    # where the blocks left can still show a confirmed slow-down, they are taken
    late = [{1: list(np.linspace(0.9, 1.3, 8))}] + [{1: list(np.linspace(1.28, 1.32, 8))}] * 3
    slow = decide(_stream(late), slower, rule)
    assert slow.depart and slow.blocks == 3 and slow.settled == "departed"

    # every rule the export times with: the decision cut short is the one all the blocks give
    rng = np.random.default_rng(0)
    three = [(w, b) for w in ("best", "cand", "cand_vs_best") for b in (1, 64)]
    cases = [(slower_verdict((1, 64)), [1, 64]), (layer_verdict((1, 64), 0.03), three),
             (per_tensor_verdict((1, 64), 0.03), three)]
    cut_short = departed = 0
    for i in range(600):
        verdict, keys = cases[i % 3]
        centre, spread = {k: rng.uniform(0.85, 1.15) for k in keys}, rng.uniform(0.01, 0.2)
        blocks = [{k: list(centre[k] * np.exp(rng.normal(0, spread, 8))) for k in keys} for _ in range(4)]
        short, full = decide(_stream(blocks), verdict, rule), decide(_stream(blocks), lambda e: verdict(e), rule)
        assert (short.depart, short.blocks <= full.blocks) == (full.depart, True)
        cut_short += short.settled == "cannot depart"
        departed += full.depart
    assert cut_short > 100 and departed > 50  # the cut is no rare event, and neither is a departure it must keep
    # a NaN ratio has no order to reason on: every block is taken, as without the stop
    nan = [{1: [math.nan, *np.linspace(0.95, 1.15, 7)]}] + [straddles] * 3
    assert decide(_stream(nan), slower, rule).blocks == decide(_stream(nan), unmarked, rule).blocks
    # a block that gives more ratios than it was asked for: the blocks left are reckoned at that size
    wide = [{1: list(np.linspace(0.95, 1.15, 16))}] * 2 + [{1: [2.0] * 16}] * 2
    assert decide(_stream(wide), slower, rule).depart and decide(_stream(wide), unmarked, rule).depart


def test_files_raced_against_one_parent_are_each_decided_as_alone():
    """`decide_each` (the ship rule for the files of one parent, timed in the same rounds) gives each file the
    decision, blocks and evidence `decide` gives it alone, and measures a file no more once it is settled."""
    from edgeq.evidence import decide_each

    rule, verdict = Rule(confidence=0.99, block_rounds=8, max_blocks=4), slower_verdict((1, 64))
    rng = np.random.default_rng(1)
    settled = set()
    for _ in range(200):
        streams = {}
        for name in ("static", "qat", "dynamic"):
            centre, spread = {k: rng.uniform(0.85, 1.3) for k in (1, 64)}, rng.uniform(0.01, 0.2)
            streams[name] = [{k: list(centre[k] * np.exp(rng.normal(0, spread, 8))) for k in (1, 64)}
                             for _ in range(4)]
        asked: list[list[str]] = []

        def block(rounds: int, names: list[str]) -> dict:
            assert rounds == rule.block_rounds
            asked.append(list(names))
            return {n: streams[n][len(asked) - 1] for n in names}

        together = decide_each(block, {n: verdict for n in streams}, rule)
        for name, d in together.items():
            alone = decide(_stream(streams[name]), verdict, rule)
            assert (d.depart, d.blocks, d.settled) == (alone.depart, alone.blocks, alone.settled)
            assert d.evidence.ratios == alone.evidence.ratios
            assert [name in names for names in asked] == [i < d.blocks for i in range(len(asked))]
            settled.add(d.settled)
        assert len(asked) == max(d.blocks for d in together.values())
    assert settled == {"ruled out", "departed", "cannot depart", "undecided: default kept"}
    # a parent with no file to decide (a device plan's parent whose int8 files were all skipped): nothing is timed
    assert decide_each(lambda rounds, names: pytest.fail(f"a block was timed for {names}"), {}, rule) == {}


@pytest.mark.parametrize("threads", [1, 2])
def test_search_decides_every_layer_and_the_weight_scales_by_measurement(cnn_onnx, calib, ds, threads):
    check = PRE.apply(ds.train.images[:512])
    plan = search_precision(cnn_onnx, calib, check, replace(FAST, threads=threads))
    assert [d["node"] for d in plan.layers] == [n for n, _ in compute_nodes(cnn_onnx)]
    for d in plan.layers:
        assert d["precision"] in ("fp32", "int8") and d["reason"]
        if "profile_us" in d:  # not timed: its profile, recorded, says fp32 cannot win at either batch size
            assert d["precision"] == "int8" and set(d["profile_us"]) == {"1", "64"}
            assert not fp32_could_win(d["profile_us"].values()) and "evidence" not in d
            continue
        assert set(d["with_node_fp32_over_int8"]) == {"1", "64"}
        assert all(r > 0 for r in d["int8_over_fp32_parent"].values())
    assert plan.cost["layers_tried"] == sum("evidence" in d for d in plan.layers)
    # the fp32 layers, each once (in the order the search decided them: which and how many are timed outcomes)
    fp32 = [d["node"] for d in plan.layers if d["precision"] == "fp32"]
    assert sorted(plan.qdq.exclude_nodes) == sorted(fp32) and len(set(plan.qdq.exclude_nodes)) == len(fp32)
    w = plan.weights
    assert w["chosen"] == ("per-channel" if plan.qdq.per_channel else "per-tensor") and w["reason"]
    if len(plan.qdq.exclude_nodes) < len(plan.layers):
        assert 0.9 < w["agreement_with_fp32"]["per_channel"] <= 1.0
        assert w["agreement_images"] == "512 training images"


def test_weight_elements_count_each_layer_by_node():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    import tempfile
    from pathlib import Path

    from edgeq.precision import weight_elements

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "m.onnx", torch.zeros(1, 12))
        assert sorted(weight_elements(path).values()) == [15, 60]
        assert list(weight_elements(path)) == [n for n, _ in compute_nodes(path)]


def test_a_layer_that_would_take_the_file_past_the_size_limit_is_never_timed(cnn_onnx, calib, ds):
    from edgeq.precision import weight_elements

    parent = cnn_onnx.stat().st_size
    elements = weight_elements(cnn_onnx, crop_padding=True)  # as the search counts them
    # the limit sits just below what keeping the largest layer in fp32 would cost: that layer is refused
    # by arithmetic, before any timing; every smaller one is timed as usual
    largest = max(elements, key=elements.get)
    lines0, lines = [], []
    plan0 = search_precision(cnn_onnx, calib, PRE.apply(ds.train.images[:64]), replace(FAST, budget_s=1e-9),
                             log=lines0.append)
    int8_ratio = plan0.cost["size_ratio"]
    limit = int8_ratio + 3 * elements[largest] / parent - 0.02  # graph overhead moves the size by ~0.005
    plan = search_precision(cnn_onnx, calib, PRE.apply(ds.train.images[:64]),
                            replace(FAST, max_size_ratio=limit, profile_screen=False), log=lines.append)
    # the summary line says why layers were not tried
    assert lines0[-1].endswith(f"({len(elements)} past the search budget)"), lines0[-1]
    assert f"(1 over the size limit of {limit:g}x its parent)" in lines[-1], lines[-1]
    by_node = {d["node"]: d for d in plan.layers}
    assert by_node[largest]["precision"] == "int8" and "over the limit" in by_node[largest]["reason"]
    assert "evidence" not in by_node[largest]
    assert any("evidence" in d for n, d in by_node.items() if n != largest)  # the others are timed
    assert plan.cost["size_ratio"] <= limit and plan.cost["max_size_ratio"] == limit


def test_kernel_taps_that_only_see_padding_are_cut_without_changing_the_outputs(tmp_path):
    from onnx import helper, numpy_helper

    from edgeq.onnx_quant import crop_padding_taps

    torch.manual_seed(0)
    model = torch.nn.Sequential(  # 4x4 -> 2x2 -> 1x1 -> 1x1: the last two convs read mostly padding
        torch.nn.Conv2d(1, 4, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, 1, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()
    path = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 4, 4))
    m = onnx.load(str(path))
    assert crop_padding_taps(m) == 2
    onnx.checker.check_model(m, full_check=True)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    kernels = [helper.get_attribute_value(next(a for a in c.attribute if a.name == "kernel_shape")) for c in convs]
    weights = {t.name: numpy_helper.to_array(t).shape for t in m.graph.initializer}
    assert kernels == [[3, 3], [2, 2], [1, 1]] and [weights[c.input[1]][2:] for c in convs] == [(3, 3), (2, 2), (1, 1)]
    onnx.save(m, str(tmp_path / "cut.onnx"))
    x = np.random.default_rng(0).standard_normal((16, 1, 4, 4)).astype(np.float32)
    before, after = load_onnx(path).run(x), load_onnx(tmp_path / "cut.onnx").run(x)
    assert np.allclose(before, after, rtol=1e-5, atol=1e-6) and not np.array_equal(before, 0 * before)
    assert crop_padding_taps(m) == 0  # nothing left to cut
    # the int8 path cuts them too: a smaller file than without the cut
    calib = [x[:8]]
    cut = quantize_onnx(path, tmp_path / "q-cut.onnx", calib, QDQConfig())
    whole = quantize_onnx(path, tmp_path / "q-whole.onnx", calib, QDQConfig(crop_padding=False))
    assert cut.stat().st_size < whole.stat().st_size
    assert np.array_equal(load_onnx(cut).run(x).argmax(1), load_onnx(whole).run(x).argmax(1))


def test_the_profile_credits_a_conv_fused_with_its_activation_to_that_conv(tmp_path, calib):
    """onnxruntime names a Conv fused with the Clip after it after the Clip's output ('<tensor>_nchwc'):
    without following the activation, every such conv read 0 us in fp32 and ranked first."""
    from edgeq.precision import rank_by_profile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU6(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    fp32 = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 28, 28))
    int8 = quantize_onnx(fp32, tmp_path / "q.onnx", calib, QDQConfig())
    nodes = compute_nodes(fp32)
    ranking = rank_by_profile(fp32, int8, nodes, {1: calib[0][:1], 4: calib[0][:4]}, 1)
    assert all(ranking[n]["fp32_us"] > 0 and ranking[n]["int8_us"] > 0 for n, _ in nodes), ranking
    assert all(set(ranking[n]["by_batch"]) == {"1", "4"} for n, _ in nodes)


def test_a_layer_is_screened_out_only_when_fp32_cannot_win_at_any_batch_size():
    """Keeping a layer in fp32 adds its fp32 kernel and removes at most its int8 kernel and the int8 graph's
    boundary steps: only when that sum is below the fp32 kernel at every batch size can it not win."""
    def at(fp32, int8, boundaries):
        return {"fp32_us": fp32, "int8_us": int8, "boundaries_us": boundaries}

    assert not fp32_could_win([at(44.6, 16.2, 3.0), at(9000.0, 2500.0, 400.0)])  # int8 far ahead at both sizes
    assert fp32_could_win([at(44.6, 16.2, 3.0), at(2800.0, 2500.0, 400.0)])  # the boundaries could pay at batch 256
    assert fp32_could_win([at(10.0, 8.0, 3.0)])  # kernel alone is faster in int8, not with its boundaries
    assert fp32_could_win([at(10.0, 0.0, 3.0)]) and fp32_could_win([at(0.0, 5.0, 1.0)])  # a node not found: unknown


def test_the_search_without_its_screen_times_every_layer(cnn_onnx, calib, ds):
    lines = []
    plan = search_precision(cnn_onnx, calib, PRE.apply(ds.train.images[:64]), replace(FAST, profile_screen=False),
                            log=lines.append)
    assert all("evidence" in d for d in plan.layers) and plan.cost["layers_tried"] == len(plan.layers)
    assert "none" in plan.cost["screen"] and "ruled out" not in lines[-1]


def test_a_profile_that_fails_leaves_no_trace_beside_the_files_and_every_layer_may_win(tmp_path, calib):
    """onnxruntime writes a profiling session's trace when the session ends, even when a call failed: beside the
    fp32 parent (the export's staging directory) that would be a stray file in the published export."""
    from edgeq.precision import rank_by_profile

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 28 * 28, 10)).eval()
    fp32 = export_onnx(model, tmp_path / "m.onnx", torch.zeros(1, 1, 28, 28))
    int8 = quantize_onnx(fp32, tmp_path / "q.onnx", calib, QDQConfig())
    before = sorted(p.name for p in tmp_path.iterdir())
    wrong = np.zeros((1, 3, 5, 5), np.float32)  # not the models' input shape: every call raises
    ranking = rank_by_profile(fp32, int8, compute_nodes(fp32), {1: wrong}, 1)
    assert all(r["fp32_could_win"] and r["gain_us"] == 0.0 for r in ranking.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_exporter_the_verifier_and_the_device_checker_time_in_one_window_length():
    """One window length for every timed decision and every check of it (the device checker's was 40 ms, the
    verifier's 15 ms): a ratio the verifier re-measures is measured as the export decided it."""
    from edgeq import timing
    from edgeq.device.check import CheckConfig
    from edgeq.verify.rows import VerifyConfig

    assert {SearchConfig().window_s, VerifyConfig().window_s, CheckConfig().window_s} == {timing.WINDOW_S}


def test_a_timed_decision_warms_its_functions_up_before_its_first_block_only(cnn_onnx, test_x, monkeypatch):
    """Between the blocks of one decision only its own timing runs, so its functions are warmed up once, before
    the first block at each input: the ship rule's blocks and the speed search's alike (the ship rule's verdict
    here never settles, so that every block is taken)."""
    from edgeq import evidence, timing
    from edgeq.precision import three_way
    from edgeq.speed import ship_race

    monkeypatch.setattr(evidence, "slower_verdict", lambda keys: lambda e: None)
    warm_ups: list[tuple[int, int, int]] = []  # (functions, input rows, calls each)
    real = timing.warm_up
    monkeypatch.setattr(timing, "warm_up", lambda fns, x, calls: warm_ups.append((len(fns), len(x), calls))
                        or real(fns, x, calls))
    inputs = {1: test_x[:1], 4: test_x[:4]}
    cfg = SearchConfig(batches=(1, 4), threads=1, rule=Rule(block_rounds=2, max_blocks=3), window_s=0.002)
    d = ship_race(cnn_onnx, {"file": cnn_onnx}, "onnx", inputs, cfg)["file"]
    assert d["evidence"]["blocks"] == 3 and d["evidence"]["settled"] == "undecided: default kept"
    assert [w for w in warm_ups if w[2]] == [(2, 1, timing.WARMUP_CALLS), (2, 4, timing.WARMUP_CALLS)]
    assert len(warm_ups) == 6  # a block per input, three blocks
    warm_ups.clear()
    runners = [load_onnx(cnn_onnx, threads=1) for _ in range(3)]
    block = three_way(*runners, inputs, cfg)
    for _ in range(2):
        ratios = block(2)
        assert set(ratios) == {(k, b) for k in ("best", "cand", "cand_vs_best") for b in inputs}
    assert [w for w in warm_ups if w[2]] == [(3, 1, timing.WARMUP_CALLS), (3, 4, timing.WARMUP_CALLS)]


@pytest.mark.parametrize("side", ["export", "device plan"])
def test_the_files_of_one_parent_are_timed_in_the_same_rounds_with_one_window_of_the_parent(cnn_onnx, test_x,
                                                                                          monkeypatch, side):
    """The ship rule's race (edgeq.evidence.ship_race, as the exporter and the device plan time with it): a round
    is a window of the parent and one of each file still undecided, so k files take k + 1 windows, not 2k; each
    file's ratios are to the parent's window of its round (the verdict here never settles, so that every block
    is taken)."""
    from edgeq import evidence, timing
    from edgeq.device import plan
    from edgeq.speed import ship_race

    monkeypatch.setattr(evidence, "slower_verdict", lambda keys: lambda e: None)
    windows: list[int] = []
    real = timing.timed_rounds
    monkeypatch.setattr(timing, "timed_rounds", lambda fns, *a, **k: windows.append(len(fns)) or real(fns, *a, **k))
    inputs, rule = {1: test_x[:1], 4: test_x[:4]}, Rule(block_rounds=2, max_blocks=3)
    files = {"a": cnn_onnx, "b": cnn_onnx}
    if side == "export":
        cfg = SearchConfig(batches=(1, 4), threads=1, rule=rule, window_s=0.002)
        gates = ship_race(cnn_onnx, files, "onnx", inputs, cfg)
    else:
        monkeypatch.setattr(evidence, "RULE", rule)
        gates = plan.ship_race(cnn_onnx, files, inputs, 1, 0.002)
    assert windows == [3] * 6  # a call per input and block: the parent and both files
    assert set(gates) == set(files)
    for gate in gates.values():
        assert gate["ship"] and gate["evidence"]["blocks"] == 3
        assert {k: r["rounds"] for k, r in gate["evidence"]["ratios"].items()} == {"1": 6, "4": 6}
        assert set(gate["latency_vs_parent"]) == {"1", "4"}
