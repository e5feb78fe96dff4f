"""ExecuTorch `.pte` programs (edgeq.pte, runtime.load(path, "pte")): tiny real models on sklearn's
8x8 digits, lowered to XNNPACK and run from their files in ExecuTorch's runtime."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeq import pte, runtime
from edgeq.errors import ExportError, IntegrityError

if pte.available() is not None:
    pytest.skip(f"ExecuTorch not installed: {pte.available()}", allow_module_level=True)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from edgeq.data import Arrays  # noqa: E402
from edgeq.metrics import agreement, sqnr_db  # noqa: E402
from edgeq.recipe import Finetune  # noqa: E402
from edgeq.train import fit, predict_logits  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(64, 48)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.flatten(x))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2)),
        )
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        return self.fc(self.flatten(self.features(x)))


class Branchy(nn.Module):
    """Data-dependent control flow: the branch taken depends on the input's values."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


class Cumsum(nn.Module):
    """A linear layer, then an op XNNPACK has no kernel for: it stays outside the delegate."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return torch.cumsum(self.fc(x.flatten(1)), dim=1)


@pytest.fixture(scope="module")
def digits() -> dict:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = ((x / 16.0 - 0.5) / 0.5).astype(np.float32).reshape(-1, 1, 8, 8)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    train, test = idx[:800], idx[1200:]
    return {"train": Arrays(x[train], y[train].astype(np.int64)), "x": x[test], "y": y[test]}


@pytest.fixture(scope="module")
def built(digits, tmp_path_factory) -> dict:
    """Both models trained, and their fp32 and static int8 programs (batch 1) written once."""
    out = tmp_path_factory.mktemp("pte")
    calibration = [digits["train"].x[i : i + 64] for i in range(0, 256, 64)]
    example = torch.from_numpy(digits["x"][:1])
    result = {}
    for name, cls in (("mlp", MLP), ("cnn", CNN)):
        torch.manual_seed(0)
        model = fit(cls(), digits["train"], Finetune(epochs=4, lr=1e-2, batch_size=64), progress=False)
        converted = pte.quantize(model, example, calibration, "static")
        result[name] = {
            "model": model, "converted": converted, "calibration": calibration, "example": example,
            "fp32": out / f"{name}-fp32.pte", "int8": out / f"{name}-int8.pte",
            "fp32_info": pte.export_fp32(model, example, out / f"{name}-fp32.pte"),
            "int8_info": pte.lower_int8(converted, example, out / f"{name}-int8.pte"),
        }
    return result


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_fp32_program_matches_eager_at_any_batch(built, digits, name):
    b = built[name]
    eager = predict_logits(b["model"], digits["x"])
    runner = runtime.load(b["fp32"], "pte", threads=1)
    assert runner.runtime == "executorch-cpu" and runner.info["program_batch"] == 1
    got = runner.predict(digits["x"], batch=37)  # 37 calls of the batch-1 program per predict batch
    np.testing.assert_allclose(got, eager, rtol=1e-4, atol=1e-4)
    assert b["fp32_info"]["input_shape"] == [1, 1, 8, 8]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_static_int8_program_keeps_accuracy_and_matches_pt2e(built, digits, name):
    b = built[name]
    fp32 = runtime.load(b["fp32"], "pte").predict(digits["x"])
    int8 = runtime.load(b["int8"], "pte").predict(digits["x"])
    with torch.no_grad():
        pt2e = b["converted"](torch.from_numpy(digits["x"])).numpy()
    acc_fp32, acc_int8 = accuracy(fp32, digits["y"]), accuracy(int8, digits["y"])
    assert acc_fp32 > 0.85
    assert acc_int8 >= acc_fp32 - 0.015, (acc_fp32, acc_int8)
    # the file is the PT2E-quantized model run by XNNPACK's int8 kernels: same decisions, close logits
    assert agreement(pt2e, int8) >= 0.99
    assert sqnr_db(pt2e, int8) > 25
    assert 15 < sqnr_db(fp32, int8) < 80  # really quantized: close to fp32 but not equal to it
    assert b["int8"].stat().st_size < b["fp32"].stat().st_size


def _scales(converted) -> list[float]:
    """The scales of a PT2E-converted graph's activation quantize ops, in graph order (the input's first)."""
    out = []
    for node in converted.graph.nodes:
        if node.op == "call_function" and "quantize_per_tensor" in str(node.target):
            scale = node.args[1]
            out.append(float(getattr(converted, scale.target) if isinstance(scale, torch.fx.Node) else scale))
    assert out, "no quantize_per_tensor op in the converted graph"
    return out


def test_minmax_observer_takes_the_calibration_range_and_histogram_does_not(built):
    b = built["mlp"]
    x = np.concatenate(b["calibration"])
    minmax = pte.quantize(b["model"], b["example"], b["calibration"], "static", observer="minmax")
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert _scales(minmax)[0] == pytest.approx((hi - lo) / 255, rel=1e-5)  # int8 [-128, 127] spans min..max
    hidden = torch.relu(b["model"].fc1(torch.from_numpy(x).flatten(1))).detach()
    assert float(hidden.max()) / 255 in [pytest.approx(s, rel=1e-5) for s in _scales(minmax)]  # fc1+ReLU's range
    # the default, a histogram, clips the hidden activations' long tail: a narrower range somewhere
    assert len(_scales(b["converted"])) == len(_scales(minmax))
    assert any(h < m * 0.99 for h, m in zip(_scales(b["converted"]), _scales(minmax)))
    with pytest.raises(ExportError, match="unknown observer 'entropy'"):
        pte.quantize(b["model"], b["example"], b["calibration"], "static", observer="entropy")


def test_etdump_profile_names_xnnpack_operators_inside_the_delegate_call(built, digits):
    prof = pte.profile(built["cnn"]["int8"], digits["x"][:1], calls=30)
    names = [o["op"] for o in prof["ops"]]
    # the CNN's two convolutions and its linear layer run as XNNPACK's int8 operators, each timed
    assert sum(n.startswith("Convolution (NHWC, QC8)") for n in names) == 2, names
    assert sum(n.startswith("Fully Connected (NC, QS8") for n in names) == 1, names
    assert 0 < prof["delegate_us"] <= prof["method_us"] and prof["wall_per_call_us"] > 0
    assert sum(o["us"] for o in prof["ops"]) <= prof["delegate_us"] * 1.05 + 1  # operators sit inside the call


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_delegation_is_what_the_file_holds(built, name):
    for kind in ("fp32", "int8"):
        d = built[name][f"{kind}_info"]["delegation"]
        in_file = pte.program_ops(built[name][kind])
        assert d["delegated_nodes"] == d["total_nodes"] > 0 and d["outside_ops"] == []
        assert in_file == {"delegates": {"XnnpackBackend": d["subgraphs"]}, "operators": []}
    # int8 graphs carry quantize/dequantize nodes inside the delegate
    assert built[name]["int8_info"]["delegation"]["total_nodes"] > built[name]["fp32_info"]["delegation"]["total_nodes"]


def test_an_op_xnnpack_refuses_stays_outside_and_a_batch_program_pads(digits, tmp_path):
    """cumsum has no XNNPACK kernel: it runs in ExecuTorch's portable kernels, and both counts say so.
    The program is exported at batch 4: 10 samples run as 4 + 4 + 2 (padded), the same logits."""
    path = tmp_path / "cumsum.pte"
    model = Cumsum().eval()
    info = pte.export_fp32(model, torch.from_numpy(digits["x"][:4]), path)
    assert info["input_shape"] == [4, 1, 8, 8]
    d = info["delegation"]
    assert d["outside_ops"] == ["aten.cumsum.default"]
    assert d["delegated_nodes"] < d["total_nodes"]
    in_file = pte.program_ops(path)
    assert in_file["delegates"] == {"XnnpackBackend": d["subgraphs"]}
    assert in_file["operators"] == ["aten::cumsum.out"]
    runner = runtime.load(path, "pte")
    assert runner.info["program_batch"] == 4
    np.testing.assert_allclose(runner.run(digits["x"][:10]), predict_logits(model, digits["x"][:10]),
                               rtol=1e-4, atol=1e-4)


def quantized_weights(graph) -> int:
    """Weights quantized per channel in a converted PT2E graph: one dequantize_per_channel each."""
    return sum(1 for n in graph.graph.nodes if "dequantize_per_channel" in str(n.target))


def test_qat_trains_the_prepared_graph_and_exclude_leaves_a_layer_fp32(built, digits, tmp_path):
    """QAT of the MLP with fc2 excluded (one quantize + lowering serves both checks, to keep this file fast)."""
    b = built["mlp"]
    seen = {}

    def finetune(model):
        seen["type"] = type(model).__name__
        return fit(model, digits["train"], Finetune(epochs=1, lr=1e-3, batch_size=64), progress=False)

    converted = pte.quantize(b["model"], b["example"], b["calibration"], "qat", exclude={"fc2"}, finetune=finetune)
    assert seen["type"] == "Trainable"
    assert quantized_weights(b["converted"]) == 2 and quantized_weights(converted) == 1  # fc2 kept in fp32
    info = pte.lower_int8(converted, b["example"], tmp_path / "qat.pte")
    assert info["delegation"]["total_nodes"] < b["int8_info"]["delegation"]["total_nodes"]
    assert info["delegation"]["outside_ops"] == []  # fp32 fc2 runs in XNNPACK's fp32 kernels, same delegate
    assert (tmp_path / "qat.pte").stat().st_size > b["int8"].stat().st_size  # fc2's weights in float
    fp32 = runtime.load(b["fp32"], "pte").predict(digits["x"])
    qat = runtime.load(tmp_path / "qat.pte", "pte").predict(digits["x"])
    assert accuracy(qat, digits["y"]) >= accuracy(fp32, digits["y"]) - 0.015
    with pytest.raises(ExportError, match="fc9"):
        pte.quantize(b["model"], b["example"], b["calibration"], "static", exclude={"fc9"})


def test_data_dependent_control_flow_is_one_line(digits, tmp_path):
    with pytest.raises(ExportError) as err:
        pte.export_fp32(Branchy().eval(), torch.from_numpy(digits["x"][:1]), tmp_path / "b.pte")
    message = str(err.value)
    assert "\n" not in message and "Branchy" in message and "data-dependent control flow" in message
    assert "test_pte.py" in message  # names the line of forward that branches
    assert not (tmp_path / "b.pte").exists()


@pytest.mark.parametrize("damage", ["truncated", "identifier", "flatbuffer", "empty"])
def test_damaged_file_is_one_line_integrity_error(built, tmp_path, damage):
    data = bytearray(built["cnn"]["int8"].read_bytes())
    match damage:
        case "truncated":
            data = data[: len(data) // 2]
        case "identifier":  # ExecuTorch's own loader aborts the process on this one
            data[5] ^= 0xFF
        case "flatbuffer":
            data[200] ^= 0xFF
        case "empty":
            data = bytearray()
    path = tmp_path / "bad.pte"
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        runtime.load(path, "pte")
    assert "\n" not in str(err.value) and "bad.pte" in str(err.value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_threads_set_xnnpack_threadpool(built):
    """threads=1 really runs on one thread: the pool has no worker thread left."""
    from executorch.extension.pybindings import portable_lib

    def os_threads() -> int:
        return len(os.listdir("/proc/self/task"))

    try:
        runtime.load(built["mlp"]["int8"], "pte", threads=3)
        assert portable_lib._threadpool_get_thread_count() == 3
        three = os_threads()
        runner = runtime.load(built["mlp"]["int8"], "pte", threads=1)
        assert portable_lib._threadpool_get_thread_count() == 1 and runner.info["threads"] == 1
        assert os_threads() == three - 2
    finally:
        pte.set_threads(1)


def test_running_a_program_imports_no_exporter(built):
    """Running a `.pte` (verify's worker, the device checker) needs only the runtime: ExecuTorch's exporter,
    `executorch.exir`, is seconds of import, and no process that only runs a program imports it."""
    code = ("import sys, numpy as np; from edgeq import pte; assert pte.available(runtime_only=True) is None; "
            f"forward, shape, _ = pte.open_program({str(built['mlp']['int8'])!r}); "
            "forward(np.zeros(shape, np.float32)); "
            "print(sorted(m for m in sys.modules if m.startswith('executorch.exir')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    # the runtime's info lines on its threadpool (what it reads of the CPU, each resize) are not the user's
    assert "cpuinfo_utils.cpp" not in out.stderr and "threadpool.cpp" not in out.stderr, out.stderr


def test_the_runtimes_info_lines_are_dropped_and_anything_else_on_stderr_passes(capfd):
    with pte.runtime_info_dropped():
        os.write(2, b"[cpuinfo_utils.cpp:125] CPU info and manual query on # of cpus dont match.\n"
                    b"E 00:00:00.000 executorch:method.cpp:1 a real error\n[threadpool.cpp:66] Resetting threadpool\n")
        print("from Python", file=sys.stderr)
    print("after", file=sys.stderr)
    err = capfd.readouterr().err.splitlines()
    assert sorted(err) == ["E 00:00:00.000 executorch:method.cpp:1 a real error", "after", "from Python"], err


def test_unavailable_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)
    reason = pte.available()
    assert reason is not None and "pip install 'edgeq[executorch]'" in reason and "\n" not in reason


def test_pattern_graphs_traced_once_change_nothing(built, digits, monkeypatch):
    """edgeq.pt2e_cache: PT2E's pattern graphs reused across calls give the same quantized models (graph,
    every weight, scale and zero point, and outputs) as tracing them on every call: static int8 of a model
    with batch norm, with and without a layer excluded. (QAT is left out here: traced on every call, its
    conv-bn folding alone costs half a minute.)"""
    import contextlib

    from edgeq import pt2e_cache
    from torchao.quantization.pt2e import utils as pt2e_utils

    b = built["cnn"]
    original = pt2e_utils._get_aten_graph_module_for_pattern

    def quantized() -> list[tuple]:
        out = []
        for exclude in ((), ("fc",)):
            q = pte.quantize(b["model"], b["example"], b["calibration"], "static", exclude=exclude)
            out.append((q.code, {k: v.clone() for k, v in q.state_dict().items()}, pte.predict(q, digits["x"])))
        return out

    cached = quantized()
    assert pt2e_cache._graphs, "no pattern graph was kept"
    assert pt2e_utils._get_aten_graph_module_for_pattern is original  # restored after each call
    monkeypatch.setattr(pt2e_cache, "traced_once", contextlib.nullcontext)
    for (code, state, out), (code2, state2, out2) in zip(quantized(), cached, strict=True):
        assert code == code2 and state.keys() == state2.keys()
        assert all(torch.equal(state[k], state2[k]) for k in state)
        np.testing.assert_array_equal(out, out2)


class Upsampled(nn.Module):
    """Bilinear upsampling, which XNNPACK's lowering matches against its traced pattern graphs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        x = nn.functional.interpolate(self.conv(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.fc(x.flatten(1))


def test_a_lowering_skips_only_the_patterns_and_lookups_that_cannot_change_its_program(built, tmp_path,
                                                                                        monkeypatch):
    """edgeq.lowering_cache: a program whose graph calls no op that XNNPACK's pattern graphs need is lowered
    without asking for them, one with bilinear upsampling with them; both give the bytes they give without
    `lean()`. Every pattern the installed ExecuTorch gives calls the op the skip is keyed on. Within the block
    the dispatcher's ops are looked up once while its registrations stay the same, and again when they change,
    listing the same ops as without it. A lowering that traces the patterns leaves the caller's random state as
    it was."""
    import contextlib

    import torch._export.utils as export_utils

    from edgeq import library_patches, lowering_cache

    from executorch.backends.xnnpack.partition.graphs import bilinear_2d

    asked: list[str] = []
    for module_name, _, attr, provider_name, op, _ in lowering_cache._PASSES:
        patterns = getattr(__import__(module_name, fromlist=[attr]), attr)
        provider = getattr(patterns, provider_name)
        graphs = list(provider())  # a dict's keys or a list: the pattern graphs
        assert graphs and all(op in library_patches.ops_called(g.graph) for g in graphs), (provider_name, op)
        monkeypatch.setattr(patterns, provider_name,
                            lambda provider=provider, name=provider_name: asked.append(name) or provider())
    upsampled = Upsampled().eval()
    example = torch.zeros(1, 1, 8, 8)
    for name, model, ex in (("mlp", built["mlp"]["model"], built["mlp"]["example"]), ("up", upsampled, example)):
        asked.clear()
        pte.export_fp32(model, ex, tmp_path / f"{name}-lean.pte")
        assert asked == ([] if name == "mlp" else ["get_graphs_dict"]), (name, asked)
        with monkeypatch.context() as m:
            m.setattr(lowering_cache, "lean", contextlib.nullcontext)
            pte.export_fp32(model, ex, tmp_path / f"{name}-full.pte")
        assert (tmp_path / f"{name}-lean.pte").read_bytes() == (tmp_path / f"{name}-full.pte").read_bytes(), name
    looked_up, real_lookups = [], export_utils._materialize_cpp_cia_ops
    monkeypatch.setattr(export_utils, "_materialize_cpp_cia_ops", lambda: looked_up.append(1) or real_lookups())
    without = export_utils._collect_all_valid_cia_ops()
    assert len(looked_up) > 1  # once per op namespace and listing, without the block
    lib = torch.library.Library("edgeq_lean_test", "DEF")
    try:
        with lowering_cache.lean():
            looked_up.clear()
            assert export_utils._collect_all_valid_cia_ops() == without
            assert export_utils._collect_all_valid_cia_ops() == without
            assert len(looked_up) == 1  # the same registrations: looked up once in the block
            lib.define("twice(Tensor x) -> Tensor")
            lib.impl("twice", lambda x: x * 2, "CompositeImplicitAutograd")
            added = export_utils._collect_all_valid_cia_ops()  # a registration more: looked up again
            assert len(looked_up) == 2 and added - without == {torch.ops.edgeq_lean_test.twice.default}
    finally:
        lib._destroy()
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    bilinear_2d._get_bilinear_2d_graphs.cache_clear()  # traced again by the next lowering, drawing from the RNG
    pte.export_fp32(upsampled, example, tmp_path / "up-again.pte")
    assert torch.equal(torch.random.get_rng_state(), state)  # a lowering leaves the caller's random state as it was


def test_within_a_lean_lowering_a_py_impl_for_a_dispatch_key_registers_as_torchs_does():
    """edgeq.lowering_cache: within `lean()`, `py_impl` for a dispatch key is edgeq's (torch's without the typing
    annotations it evaluates for each call), and torch's again after the block. It registers the kernel under the
    key as torch's does, clears the op's dispatch cache, and refuses a key the op has a kernel for already with
    torch's error. What is not a plain dispatch key (Python, a dispatch mode) goes to torch's own: it refuses
    Python and takes a mode as it does outside the block."""
    from torch._C import DispatchKey
    from torch._ops import OperatorBase
    from torch.utils._python_dispatch import TorchDispatchMode

    from edgeq import lowering_cache

    class Mode(TorchDispatchMode):
        pass

    op, key = torch.ops.aten.erfinv.default, DispatchKey.AutocastXPU
    torchs = OperatorBase.py_impl
    assert key not in op.py_kernels and Mode not in op.python_key_table

    def fn(*args, **kwargs):
        return NotImplemented

    def register(k):
        """(what the first registration added, the error of the first or of the second), the op restored after."""
        kernels, modes = dict(op.py_kernels), dict(op.python_key_table)
        op._dispatch_cache[key] = "stale"
        try:
            op.py_impl(k)(fn)
            added = {**{k: v for k, v in op.py_kernels.items() if kernels.get(k) is not v},
                     **{k: v for k, v in op.python_key_table.items() if modes.get(k) is not v}}
            cleared = key not in op._dispatch_cache
            try:
                op.py_impl(k)(fn)
                return added, cleared, None
            except (RuntimeError, AssertionError) as e:
                return added, cleared, f"{type(e).__name__}: {e}"
        except (RuntimeError, AssertionError) as e:
            return None, None, f"{type(e).__name__}: {e}"
        finally:
            for table, saved in ((op.py_kernels, kernels), (op.python_key_table, modes)):
                table.clear()
                table.update(saved)
            op._dispatch_cache.clear()

    outside = [register(k) for k in (key, DispatchKey.Python, Mode)]
    with lowering_cache.lean():
        assert op.py_impl(key).__qualname__.startswith("_registering.")  # a plain key takes edgeq's registration
        assert not op.py_impl(Mode).__qualname__.startswith("_registering.")  # a mode torch's own
        inside = [register(k) for k in (key, DispatchKey.Python, Mode)]
    assert OperatorBase.py_impl is torchs
    assert inside == outside
    assert outside[0] == ({key: fn}, True, f"RuntimeError: Trying to override a python impl for {key} on operator "
                                           f"{op.name()}")
    assert outside[1][0] is None and "DispatchKey.Python" in outside[1][2]
    assert outside[2][0] == {Mode: fn} and "already registered" in outside[2][2]
    assert key not in op.py_kernels and Mode not in op.python_key_table


def test_qat_folds_batch_norm_tracing_only_the_convolutions_the_model_has(built, digits, monkeypatch):
    """edgeq.pt2e_cache: QAT's batch-norm fold traces its 12 pattern pairs per kind of convolution only for
    the kinds the graph calls (here conv2d); for another kind (conv1d) it does to the graph exactly what
    torchao's fold does when none of that kind's patterns matches: same code, weights, modules, outputs."""
    import torch.nn.functional as F

    from edgeq import pt2e_cache
    from torchao.quantization.pt2e import qat_utils
    from torchao.quantization.pt2e import quantize_pt2e as qp

    b, folded = built["cnn"], []
    fold = qp._fold_conv_bn_qat
    monkeypatch.setattr(qp, "_fold_conv_bn_qat", lambda m: folded.append(copy.deepcopy(m)) or fold(m))
    helper, traced_kinds = qat_utils._fold_conv_bn_qat_helper, []

    def spy(m, conv_fn, example_inputs, is_cuda):  # torchao's fold of one kind, patterns traced
        traced_kinds.append(conv_fn.__name__)
        return helper(m, conv_fn, example_inputs, is_cuda)

    monkeypatch.setattr(qat_utils, "_fold_conv_bn_qat_helper", spy)
    pte.quantize(b["model"], b["example"], b["calibration"], "qat")
    assert set(traced_kinds) == {"conv2d"} and len(folded) == 1  # (twice on a machine with CUDA)
    ours = pt2e_cache._fold_without_patterns(qat_utils, copy.deepcopy(folded[0]))
    inputs = (torch.randn(1, 1, 3), torch.randn(1, 1, 1), *(torch.randn(1) for _ in range(4)))
    theirs = helper(copy.deepcopy(folded[0]), F.conv1d, inputs, is_cuda=False)
    assert ours.code == theirs.code
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    state, state2 = ours.state_dict(), theirs.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    x = torch.from_numpy(digits["x"][:32])
    assert torch.equal(ours(x), theirs(x))


def _annotations(m) -> dict:
    """Each node's PT2E annotation as text (its qspecs name nodes by name): comparable across graph copies."""
    out = {}
    for n in m.graph.nodes:
        a = n.meta.get("quantization_annotation")
        if a is not None:
            out[n.name] = (sorted((k.name, repr(v)) for k, v in a.input_qspec_map.items()), repr(a.output_qspec),
                           a._annotated)
    return out


def test_qat_prepares_tracing_only_the_convolutions_the_model_has(built, digits, monkeypatch):
    """edgeq.pt2e_cache: `prepare_qat_pt2e` annotates conv-bn and fuses it tracing patterns only for the kinds
    of convolution the graph calls (here conv2d: no transposed convolution's annotation, no conv1d or transposed
    fuse); for a kind the graph does not call, each step does to the graph exactly what the library's own does
    when none of that kind's patterns matches: same code, modules, weights, annotations, outputs."""
    import torch.nn.functional as F

    from edgeq import pt2e_cache
    from torchao.quantization.pt2e import qat_utils
    from torchao.quantization.pt2e import quantize_pt2e as qp
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as xq

    b, fused, fuse_kinds, annotated = built["cnn"], [], [], []
    fuse = qp._fuse_conv_bn_qat
    monkeypatch.setattr(qp, "_fuse_conv_bn_qat", lambda m: fused.append(copy.deepcopy(m)) or fuse(m))
    helper, annotate = qat_utils._fuse_conv_bn_qat_helper, xq._do_annotate_conv_bn

    def spy_fuse(m, conv_fn, example_inputs, is_cuda):  # torchao's fuse of one kind, patterns traced
        fuse_kinds.append(conv_fn.__name__)
        return helper(m, conv_fn, example_inputs, is_cuda)

    def spy_annotate(gm, config, filter_fn, has_relu, is_conv_transpose=False):  # XNNPACK's, patterns traced
        annotated.append(is_conv_transpose)
        return annotate(gm, config, filter_fn, has_relu=has_relu, is_conv_transpose=is_conv_transpose)

    monkeypatch.setattr(qat_utils, "_fuse_conv_bn_qat_helper", spy_fuse)
    monkeypatch.setattr(xq, "_do_annotate_conv_bn", spy_annotate)
    pte.quantize(b["model"], b["example"], b["calibration"], "qat")
    assert set(fuse_kinds) == {"conv2d"} and len(fused) == 1  # (twice on a machine with CUDA)
    assert annotated and not any(annotated)  # conv-bn and conv-bn-relu of conv1d/conv2d; no transposed pattern

    ours = pt2e_cache._fuse_without_patterns(qat_utils, copy.deepcopy(fused[0]))
    inputs = (torch.randn(1, 1, 3), torch.randn(1, 1, 1), *(torch.randn(1) for _ in range(5)))  # x, conv w, b, bn
    theirs = helper(copy.deepcopy(fused[0]), F.conv1d, inputs, is_cuda=False)
    assert ours.code == theirs.code and _annotations(ours) == _annotations(theirs) and _annotations(ours)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    state, state2 = ours.state_dict(), theirs.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    x = torch.from_numpy(digits["x"][:32])
    assert torch.equal(ours(x), theirs(x))

    graph, config = pte.graph_for(b["model"], b["example"], "qat"), pte.quantization_config(True)
    for relu in (False, True):
        mine, lib = copy.deepcopy(graph), copy.deepcopy(graph)
        assert pt2e_cache._annotate_present_only(xq)(mine, config, None, relu, is_conv_transpose=True) == []
        assert annotate(lib, config, None, has_relu=relu, is_conv_transpose=True) == []
        assert mine.code == lib.code and _annotations(mine) == _annotations(lib)


def test_qat_of_a_model_with_stochastic_depth_and_dropout_lowers(digits, tmp_path):
    """QAT captures batch norm in training mode and nothing else: torchvision's StochasticDepth (as in
    EfficientNet) traced in training mode leaves aten.bernoulli, which no ExecuTorch program can hold."""
    from conftest import stochastic_residual

    torch.manual_seed(0)
    model = fit(stochastic_residual(8, 0.2), digits["train"], Finetune(epochs=1, lr=1e-2, batch_size=64), progress=False)
    example, calibration = torch.from_numpy(digits["x"][:1]), [digits["train"].x[:64]]
    converted = pte.quantize(model, example, calibration, "qat", finetune=lambda m: fit(
        m, digits["train"], Finetune(epochs=1, lr=1e-3, batch_size=64), progress=False))
    assert not any("bernoulli" in str(n.target) for n in converted.graph.nodes)
    pte.lower_int8(converted, example, tmp_path / "qat.pte")
    fp32 = predict_logits(model.eval(), digits["x"])
    qat = runtime.load(tmp_path / "qat.pte", "pte").predict(digits["x"])
    assert accuracy(qat, digits["y"]) >= accuracy(fp32, digits["y"]) - 0.05


def test_the_calibration_kept_is_lowered_as_screened_not_quantized_again(digits, built, tmp_path, monkeypatch):
    """Each static calibration candidate is quantized and screened in torch once; the one kept is the
    program lowered (ProgramTrials keeps the screened models and their scores), so the bar's first step
    costs no quantization and no screen."""
    import json

    import edgeq
    from edgeq.recipe import Recipe

    calls, captures, screens = [], [], []
    real, real_graph, real_predict = pte.quantize, pte.graph_for, pte.predict
    monkeypatch.setattr(pte, "quantize", lambda *a, **k: calls.append(k.get("observer")) or real(*a, **k))
    monkeypatch.setattr(pte, "graph_for", lambda *a, **k: captures.append(a[2]) or real_graph(*a, **k))
    monkeypatch.setattr(pte, "predict", lambda *a, **k: screens.append(1) or real_predict(*a, **k))
    train = digits["train"]
    recipe = Recipe(variants=("static",), ship_rule="always", search_budget_s=1e-6, batches=(1, 8), sensitivity=False,
                    calibration_methods=("MinMax",), calibration_sizes=(128, 256), pte_observers=("histogram", "minmax"),
                    bias_correction=(False,), jobs=1)
    edgeq.compress({"mlp": built["mlp"]["model"]}, train=(train.x, train.y), test=(digits["x"], digits["y"]),
                   out=tmp_path / "art", recipe=recipe, progress=False, log=lambda s: None)
    bar = json.loads((tmp_path / "art" / "plan.json").read_text())["models"]["mlp"]["accuracy"]["mlp-static-pte"]
    assert len(bar["calibration"]["candidates"]) == 4 and bar["met"] and len(bar["steps"]) == 1
    assert sorted(calls) == ["histogram", "histogram", "minmax", "minmax"]  # four screens, no fifth to lower
    assert len(screens) == 4  # the bar's first step is the candidate kept, not screened again
    assert captures == ["static"]  # the model captured once: each candidate prepares a copy of its graph


def test_the_static_programs_share_what_the_onnx_bars_left_of_the_accuracy_budget(digits, built, tmp_path,
                                                                                 monkeypatch):
    """With a dense and a channel-pruned parent, each static program's bar gets an equal part of what the int8
    ONNX bars left of the accuracy budget, and the last what is left: the first cannot spend the part of the
    next (a dense program that misses its contract whatever it tries left the pruned one 0.09 s of 54 s)."""
    import edgeq
    from edgeq import programs
    from edgeq.recipe import Recipe

    seen, real = [], programs._calibration

    def spy(fam, mode, screen, budget_s=float("inf")):  # a static bar's first step: the share it is given
        budget = fam.budgets["accuracy"]
        seen.append((screen.__self__.name, budget.seconds, budget.parents, budget.share()))
        assert budget_s == budget.share()
        return real(fam, mode, screen, budget_s)

    monkeypatch.setattr(programs, "_calibration", spy)
    train = digits["train"]
    recipe = Recipe(variants=("structured", "static"), ship_rule="always", search_budget_s=1e-6, batches=(1, 8),
                    sensitivity=False, calibration_methods=("MinMax",), calibration_sizes=(128,),
                    pte_observers=("minmax",), bias_correction=(False,), jobs=1)
    edgeq.compress({"mlp": built["mlp"]["model"]}, train=(train.x, train.y), test=(digits["x"], digits["y"]),
                   out=tmp_path / "art", recipe=recipe, progress=False, log=lambda s: None)
    assert [name for name, *_ in seen] == ["mlp-static-pte", "mlp-structured-static-pte"]
    (_, left, parts, share), (_, left2, parts2, share2) = seen
    assert parts == 2 and share == pytest.approx(left / 2) and 0 < left <= recipe.accuracy_budget_s
    assert parts2 == 1 and share2 == left2 > 0


def test_a_static_bars_calibration_candidates_stop_at_its_share_and_record_what_was_not_tried():
    """The calibration candidates are the static bar's first steps and spend its share of the accuracy budget:
    the first is always measured; with nothing left (the int8 ONNX bars spent it) no other is, and the plan
    says which were not; without a budget every candidate is measured and the most accurate kept."""
    import time
    from types import SimpleNamespace

    from edgeq import programs

    settings = SimpleNamespace(programs=SimpleNamespace(pte_observers=("histogram", "minmax"), calibration_sizes=(128, 512)))
    fam = SimpleNamespace(calibration=[np.zeros((64, 4), np.float32)] * 8, val=[0] * 10, settings=settings,
                          build=SimpleNamespace(log=lambda s: None))
    screened = []

    def screen(nodes, c):
        screened.append((c["observer"], c["samples"]))
        time.sleep(0.01)
        return {"correct": len(screened), "accuracy": len(screened) / 10, "agreement": 0.9, "sqnr_db": 10.0}

    cal = programs._calibration(fam, "static", screen, budget_s=0.0)
    assert screened == [("histogram", 128)] and (cal["observer"], cal["samples"]) == ("histogram", 128)
    assert cal["not_tried"] == [{"observer": "histogram", "samples": 512}, {"observer": "minmax", "samples": 128},
                                {"observer": "minmax", "samples": 512}] and cal["budget_s"] == 0.0
    assert "3 not tried within the accuracy budget" in programs._describe(cal)
    screened.clear()
    cal = programs._calibration(fam, "static", screen)
    assert len(screened) == 4 and "not_tried" not in cal and (cal["observer"], cal["samples"]) == ("minmax", 512)


def test_a_copy_of_the_captured_graph_gives_the_program_a_capture_gives(built, tmp_path):
    """`quantize(captured=graph_for(...))` prepares a copy of one capture: the same program, byte for byte, as
    quantizing with a fresh capture, and the graph it was given is left as it was, for the next candidate."""
    b = built["cnn"]
    graph = pte.graph_for(b["model"], b["example"], "static")
    before = graph.code
    fresh = pte.quantize(b["model"], b["example"], b["calibration"], "static", exclude={"features.0"})
    for i in range(2):
        copied = pte.quantize(b["model"], b["example"], b["calibration"], "static", exclude={"features.0"},
                              captured=graph)
        pte.lower_int8(copied, b["example"], tmp_path / f"copy{i}.pte")
    pte.lower_int8(fresh, b["example"], tmp_path / "fresh.pte")
    assert graph.code == before
    assert (tmp_path / "copy0.pte").read_bytes() == (tmp_path / "fresh.pte").read_bytes()
    assert (tmp_path / "copy1.pte").read_bytes() == (tmp_path / "fresh.pte").read_bytes()


def test_the_program_bar_stops_at_its_budget_and_records_what_it_did_not_try():
    """The static `.pte` bar's units are tried within the accuracy budget: none past a zero budget (the
    all-int8 program is always built), every one without a budget, and the units left are recorded."""
    from edgeq.programs import _fallback

    units = [("gates", ["se"]), ("stem", ["stem"]), ("head", ["head"])]
    layers = ["stem", "mid", "head"]

    def run(budget_s: float):
        built = []
        build = lambda nodes: built.append(nodes) or {"correct": 90, "agreement": 0.9}  # noqa: E731
        return _fallback(build, units, lambda s: (False, 1.0), 0.5, layers, budget_s), built

    bar, built = run(0.0)
    assert built == [()] and bar["not_tried"] == ["gates", "stem", "head"] and bar["budget_s"] == 0
    bar, built = run(float("inf"))
    assert len(built) == 4 and "not_tried" not in bar and not bar["met"]


def test_the_speed_step_tries_gates_then_depthwise_convolutions_then_the_stem(monkeypatch):
    """The `.pte` speed step's units on an MBConv-like model: its squeeze-excitation gate, its depthwise
    convolutions (groups == in_channels; not the grouped one), its stem, in that order; a unit the accuracy
    bar already left in fp32 is not tried again. The MNIST CNN has no depthwise convolution: its units, and so
    its plans, are what they were."""
    from edgeq.programs import _layers, speed_units

    class Gate(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))

    class MBConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.dw1d = nn.Conv1d(16, 16, 3, padding=1, groups=16)
            self.se = Gate(16)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.se(self.grouped(torch.relu(self.dw(torch.relu(self.stem(x))))))
            return self.head(self.dw1d(x.mean(3)).mean(2))

    model, example = MBConv().eval(), torch.zeros(1, 1, 8, 8)
    layers = _layers(model)
    gates = pte.gate_modules(model, example)
    assert speed_units(model, gates, layers, []) == [("gates", ["se"]), ("depthwise", ["dw", "dw1d"]),
                                                     ("stem", ["stem"])]
    assert [u for u, _ in speed_units(model, gates, layers, ["dw", "dw1d", "stem"])] == ["gates"]
    cnn = CNN().eval()
    assert [u for u, _ in speed_units(cnn, pte.gate_modules(cnn, example), _layers(cnn), [])] == ["stem"]
    # the gates found in the graph every static candidate is prepared from: the same, and no capture more
    graph = pte.graph_for(model, example, "static")
    monkeypatch.setattr(pte, "capture", lambda *a, **k: pytest.fail("gate_modules captured the model again"))
    assert pte.gate_modules(model, example, graph) == ["se"]


def test_the_speed_step_lowers_each_candidate_once_and_ships_the_one_it_keeps(digits, built, tmp_path, monkeypatch):
    """The speed step lowers the program with each unit in fp32 once; the program it keeps is put back from
    its own file, not lowered again. What it keeps is timed here and not asserted: only that the shipped file
    is a program it lowered, scored as recorded."""
    import hashlib
    import json

    import edgeq
    from edgeq.recipe import Recipe

    lowered = []
    real = pte.lower_int8

    def counted(*args, **kwargs):
        info = real(*args, **kwargs)
        lowered.append(hashlib.sha256(Path(args[2]).read_bytes()).hexdigest())
        return info

    monkeypatch.setattr(pte, "lower_int8", counted)
    train = digits["train"]
    recipe = Recipe(variants=("static",), ship_rule="always", search_budget_s=1000.0, batches=(1, 8),
                    sensitivity=False, calibration_methods=("MinMax",), calibration_sizes=(256,),
                    pte_observers=("histogram",), bias_correction=(False,), jobs=1)
    edgeq.compress({"mlp": built["mlp"]["model"]}, train=(train.x, train.y), test=(digits["x"], digits["y"]),
                   out=tmp_path / "art", recipe=recipe, progress=False, log=lambda s: None)
    bar = json.loads((tmp_path / "art" / "plan.json").read_text())["models"]["mlp"]["accuracy"]["mlp-static-pte"]
    assert bar["met"] and [u["unit"] for u in bar["speed"]["units"]] == ["stem"]
    assert len(lowered) == 1 + len(bar["speed"]["units"])  # the all-int8 program, then the stem in fp32: no third
    assert hashlib.sha256((tmp_path / "art" / "mlp-static.pte").read_bytes()).hexdigest() in lowered
    assert bar["fp32_nodes_added"] == (["fc1"] if bar["speed"]["units"][0]["kept"] else [])


def test_a_program_lowered_on_a_pool_worker_is_the_program_lowered_here(built, tmp_path, capfd):
    """`lower_int8_beside` sends the captured program to a pool worker, which sends the program's bytes back:
    the file, written when its result is taken, is the one `lower_int8` wrote here, with the same manifest
    information. Without a local worker (one job) it is lowered here, at once. The worker writes
    nothing to the export's stderr (its first torchao import logged a torch deprecation line there)."""
    from edgeq.trials import Pool, Workers

    b = built["cnn"]
    here = pte.lower_int8_beside(b["converted"], b["example"], tmp_path / "here.pte", Pool(Workers(jobs=1)))
    assert (tmp_path / "here.pte").exists() and here.pid == os.getpid() and not here.pending
    with Pool(Workers(jobs=2)) as pool:
        lowering = pte.lower_int8_beside(b["converted"], b["example"], tmp_path / "beside.pte", pool)
        assert lowering.pending and not (tmp_path / "beside.pte").exists()  # written by `result`, not before
        info = lowering.result()
        assert not lowering.pending
    assert lowering.pid != os.getpid()  # lowered on the worker
    assert (tmp_path / "beside.pte").read_bytes() == b["int8"].read_bytes()
    assert info == b["int8_info"] and here.result() == b["int8_info"]
    assert not re.findall(r"(?m)^[DIWEF]\d{4} .*$", capfd.readouterr().err)  # torch's log lines (glog's prefix)


def test_a_program_whose_worker_dies_while_lowering_it_is_lowered_here(built, tmp_path):
    """A worker killed in the middle of a lowering (the out-of-memory killer, a crash in native code): taking
    the result lowers the program in this process instead, to the same bytes, and the pool restarts. Until
    then the broken pool is sent nothing: a program lowered ahead is not sent (None), one beside is lowered here."""
    import signal

    from edgeq.trials import Pool, Workers

    b = built["cnn"]
    with Pool(Workers(jobs=2)) as pool:
        lowering = pte.lower_int8_beside(b["converted"], b["example"], tmp_path / "beside.pte", pool)
        future = lowering._job[2]
        workers = list(pool._executor._processes.values())
        assert workers and not future.done(), "the worker finished first: the test would prove nothing"
        for worker in workers:
            os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not pool._executor._broken and time.monotonic() < deadline:  # its manager thread sees the deaths
            time.sleep(0.05)
        assert pool._executor._broken
        assert pte.lower_int8_ahead(b["converted"], b["example"], tmp_path / "ahead.pte", pool) is None
        here = pte.lower_int8_beside(b["converted"], b["example"], tmp_path / "here.pte", pool)
        assert not here.pending and here.pid == os.getpid()
        info = lowering.result()
        assert pool._executor is None  # restarted: the next job starts a new set of workers
    assert lowering.pid == os.getpid() and not lowering.pending
    assert (tmp_path / "beside.pte").read_bytes() == b["int8"].read_bytes() and info == b["int8_info"]


def test_the_qat_program_lowers_on_a_worker_while_the_fp32_program_is_lowered_and_the_static_one_screened(
        digits, built, tmp_path, monkeypatch):
    """With two jobs, the pool's workers are sent lowering's imports, then the QAT program is trained and
    sent to a pool worker to be lowered before the fp32
    program is lowered here and the static program's bar runs; the program it ships is, byte for byte, the one
    its quantized model lowers to here. The static program's speed step's first candidate (the stem in fp32) is
    sent to a worker just before the bar's program is lowered here, and the step times the worker's program:
    byte for byte the candidate lowered here; the step lowers nothing here again."""
    import json

    import edgeq
    from edgeq import programs
    from edgeq.recipe import Recipe

    from edgeq.trials import Pool

    real, sent, order = pte.lower_int8_beside, [], []
    real_warm = Pool.warm_up
    monkeypatch.setattr(Pool, "warm_up", lambda self: order.append(("warm", self._warm.__name__)) or real_warm(self))

    def keep(converted, example, path, pool=None):
        order.append(("qat sent", Path(path).name))
        sent.append((converted, example, Path(path)))
        return real(converted, example, path, pool)

    monkeypatch.setattr(pte, "lower_int8_beside", keep)
    real_ahead, real_here, ahead, taken = pte.lower_int8_ahead, pte.lower_int8, [], []

    def ahead_sent(converted, example, path, pool=None):
        order.append(("ahead sent", Path(path).name))
        ahead.append((converted, example))
        return real_ahead(converted, example, path, pool)

    monkeypatch.setattr(pte, "lower_int8_ahead", ahead_sent)
    monkeypatch.setattr(pte, "lower_int8", lambda c, e, path: order.append(("here", Path(path).name))
                        or real_here(c, e, path))
    real_result = pte.Lowering.result

    def result(self):
        info = real_result(self)
        taken.append((self.path.name, self.pid, self.path.read_bytes()))  # what the step is given to time
        return info

    monkeypatch.setattr(pte.Lowering, "result", result)
    real_fp32 = pte.export_fp32
    monkeypatch.setattr(pte, "export_fp32", lambda m, e, path: order.append(("fp32", Path(path).name))
                        or real_fp32(m, e, path))
    real_screen = programs.ProgramTrials.screen
    monkeypatch.setattr(programs.ProgramTrials, "screen",
                        lambda self, *a: order.append(("screen", self.name)) or real_screen(self, *a))
    train = digits["train"]
    recipe = Recipe(variants=("static", "qat"), ship_rule="always", search_budget_s=1000.0, batches=(1, 8),
                    sensitivity=False, calibration_methods=("MinMax",), calibration_sizes=(128,),
                    pte_observers=("minmax", "histogram"), bias_correction=(False,), jobs=2)
    edgeq.compress({"mlp": built["mlp"]["model"]}, train=(train.x, train.y), test=(digits["x"], digits["y"]),
                   out=tmp_path / "art", recipe=recipe, progress=False, log=lambda s: None)
    assert order[:3] == [("warm", "import_lowering"), ("qat sent", "mlp-qat.pte"), ("fp32", "mlp-fp32.pte")]
    assert ("screen", "mlp-static-pte") in order[3:]
    static = [step for step in order if step[1] == "mlp-static.pte"]
    assert static == [("ahead sent", "mlp-static.pte"), ("here", "mlp-static.pte")]  # nothing else lowered here
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())["models"]["mlp"]["accuracy"]["mlp-static-pte"]
    assert [u["unit"] for u in plan["speed"]["units"]] == ["stem"]
    (converted, example), = ahead
    pte.lower_int8(converted, example, tmp_path / "stem-here.pte")
    (pid, timed_bytes), = [(pid, data) for name, pid, data in taken if name == "mlp-static.pte"]
    assert pid != os.getpid() and timed_bytes == (tmp_path / "stem-here.pte").read_bytes()  # a worker's, the same
    assert plan["fp32_nodes_added"] == (["fc1"] if plan["speed"]["units"][0]["kept"] else [])
    if plan["speed"]["units"][0]["kept"]:  # what ships is then the worker's program
        assert (tmp_path / "art" / "mlp-static.pte").read_bytes() == timed_bytes
    (converted, example, path), = sent
    info = pte.lower_int8(converted, example, tmp_path / "here.pte")
    assert path.name == "mlp-qat.pte" and (tmp_path / "art" / path.name).read_bytes() == (tmp_path / "here.pte").read_bytes()
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    art = next(a for a in manifest["artifacts"] if a["name"] == "mlp-qat-pte")
    assert art["runtime"]["delegation"] == info["delegation"]


def test_a_qat_program_started_before_its_fp32_program_failed_is_not_left_behind(digits, built, tmp_path,
                                                                                 monkeypatch):
    """The QAT program is started before its fp32 program is lowered; when the fp32 program then fails, the
    QAT one is not shipped, its file is not left, and `skipped` says why."""
    import json

    import edgeq
    from edgeq.recipe import Recipe

    def refuse(model, example, path):
        raise ExportError("lowering refused for this test")

    monkeypatch.setattr(pte, "export_fp32", refuse)
    train = digits["train"]
    for jobs in (1, 2):
        recipe = Recipe(variants=("qat",), ship_rule="always", search_budget_s=1e-6, batches=(1,), sensitivity=False,
                        calibration_methods=("MinMax",), calibration_sizes=(128,), bias_correction=(False,), jobs=jobs)
        out = tmp_path / f"art{jobs}"
        edgeq.compress({"mlp": built["mlp"]["model"]}, train=(train.x, train.y), test=(digits["x"], digits["y"]),
                       out=out, recipe=recipe, progress=False, log=lambda s: None)
        manifest = json.loads((out / "manifest.json").read_text())
        assert not list(out.glob("*.pte")) and not [a for a in manifest["artifacts"] if a["format"] == "pte"]
        skipped = {s["name"]: s["reason"] for s in manifest["skipped"]}
        assert "lowering refused for this test" in skipped["mlp-fp32-pte"]
        assert skipped["mlp-qat-pte"] == "its fp32 parent mlp-fp32-pte was not shipped"
