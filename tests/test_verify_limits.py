"""`edgeq verify` against hostile files: time limits, the memory cap, the fp32 speed gate. Real files, no mocks.

Each hostile file replaces one artifact of a copy of the `mlp_artifacts` export and is re-hashed into the
manifest, so that integrity passes and what is tested is what running it does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from test_verify import FAST, copy, rehash, row

from edgeq.runtime import INPUT_NAME, OUTPUT_NAME
from edgeq.verify import verify
from edgeq.verify.command import verify as verify_command
from edgeq.verify.core import gate
from edgeq.verify.latency import speed_flags
from edgeq.verify.report import REPORT_SCHEMA, table, to_json
from edgeq.verify.rows import FP32_SLOWDOWN_LIMIT, Row
from edgeq.verify.worker import Worker

LIMIT_S = 3.0  # the limit the hanging files run under; every honest step here takes well under 0.3 s
WALL_S = 60.0  # a verify that returns later than this is as good as hung (a hang would stall the suite)
FOREVER = 10**15  # loop iterations: days of work


# hostile files --------------------------------------------------------------------------------------


def _const(value: object, name: str, dtype: type) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype), name)


def _loop(trips: str, start: str, name: str) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A Loop node `name` that adds 0 to the float scalar `start` as many times as the int64 scalar `trips`."""
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "zero"], ["v_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])],
        [_const(0.0, "zero", np.float32)],
    )
    return (helper.make_node("Loop", [trips, f"{name}_cond", start], [name], body=body),
            [_const(True, f"{name}_cond", np.bool_)])


def _model(nodes: list, inits: list) -> onnx.ModelProto:
    """input [batch, 1, 28, 28] -> logits [batch, 10], named as edgeq's exporter names them."""
    graph = helper.make_graph(nodes, "hostile",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _endless(path: Path, trip_nodes: list, trip_consts: list) -> None:
    """Logits of a zero linear layer, plus a scalar from a Loop whose trip count `trip_nodes` compute."""
    loop, consts = _loop("trips", "v0", "v")
    model = _model([*trip_nodes, loop, helper.make_node("Flatten", [INPUT_NAME], ["flat"]),
                    helper.make_node("MatMul", ["flat", "w"], ["mm"]),
                    helper.make_node("Add", ["mm", "v"], [OUTPUT_NAME])],
                   [*trip_consts, *consts, _const(0.0, "v0", np.float32), _const(np.zeros((784, 10)), "w", np.float32)])
    onnx.save(model, str(path))


def endless_loop_onnx(path: Path) -> None:
    """A Loop of FOREVER iterations on every call."""
    _endless(path, [], [_const(FOREVER, "trips", np.int64)])


def endless_below_batch_500_onnx(path: Path) -> None:
    """No iterations at the accuracy pass's batch of 500; FOREVER at any smaller batch (as timing uses)."""
    _endless(path, [helper.make_node("Shape", [INPUT_NAME], ["shape"]),
                    helper.make_node("Gather", ["shape", "zero_index"], ["batch"]),
                    helper.make_node("Less", ["batch", "five_hundred"], ["small"]),
                    helper.make_node("Cast", ["small"], ["small_int"], to=TensorProto.INT64),
                    helper.make_node("Mul", ["small_int", "forever"], ["trips"])],
             [_const(0, "zero_index", np.int64), _const(500, "five_hundred", np.int64),
              _const(FOREVER, "forever", np.int64)])


def huge_tensor_onnx(path: Path, copies: int) -> None:
    """The input expanded to [batch, copies, 28, 28] (batch * copies * 3 KiB), then averaged back."""
    model = _model([helper.make_node("Expand", [INPUT_NAME, "shape"], ["big"]),
                    helper.make_node("ReduceMean", ["big"], ["mean"], axes=[1], keepdims=0),
                    helper.make_node("Flatten", ["mean"], ["flat"]),
                    helper.make_node("MatMul", ["flat", "w"], [OUTPUT_NAME])],
                   [_const([1, copies, 1, 1], "shape", np.int64), _const(np.zeros((784, 10)), "w", np.float32)])
    onnx.save(model, str(path))


def slowed_onnx(path: Path, trips: int) -> None:
    """The same model, bit for bit the same logits, plus a Loop of `trips` iterations on 0 * sum(input)."""
    model = onnx.load(str(path))
    g = model.graph
    for node in g.node:
        node.output[:] = ["original_logits" if o == OUTPUT_NAME else o for o in node.output]
    loop, consts = _loop("trips", "v0", "v")
    g.node.extend([helper.make_node("ReduceSum", [INPUT_NAME], ["total"], keepdims=0),
                   helper.make_node("Mul", ["total", "zero0"], ["v0"]), loop,
                   helper.make_node("Add", ["original_logits", "v"], [OUTPUT_NAME])])
    g.initializer.extend([*consts, _const(trips, "trips", np.int64), _const(0.0, "zero0", np.float32)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class _Endless(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = 0
        while i < 1_000_000_000_000_000:  # FOREVER; TorchScript needs the literal
            i += 1
        return x.flatten(1)[:, :10] + i


def endless_torchscript(path: Path) -> None:
    torch.jit.save(torch.jit.script(_Endless()), str(path))


def _replace(mlp_artifacts: Path, tmp_path: Path, name: str, write) -> tuple[Path, str]:
    """A copy of the export with artifact `name`'s file rewritten by write(path) and re-hashed: (dir, file)."""
    art = copy(mlp_artifacts, tmp_path)
    file = next(a["file"] for a in json.loads((art / "manifest.json").read_text())["artifacts"] if a["name"] == name)
    write(art / file)
    rehash(art, name)
    return art, file


def _only_failure(result, name: str, file: str, *expected: str) -> str:
    """Row `name` failed with a one-line reason naming the file and holding `expected`; every other row passed."""
    bad = row(result, name)
    assert not result.passed and bad.status == "FAIL"
    reason = next((r for r in bad.reasons if expected[0] in r), f"none of {bad.reasons} says {expected[0]!r}")
    assert reason.startswith(f"{file}: ") and "\n" not in reason and all(e in reason for e in expected), reason
    others = [r for r in result.rows if r.name != name and r.status != "skipped"]
    assert others and all(r.status == "ok" and r.p50_ms_b1 is not None for r in others), result.failures
    return reason


# time limits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "write", "step"), [
    ("mlp-static-onnx", endless_loop_onnx, "load and accuracy on 1000 samples"),
    ("mlp-static-ts", endless_torchscript, "load and accuracy on 1000 samples"),
    ("mlp-static-onnx", endless_below_batch_500_onnx, "accuracy on the 800 validation samples"),  # below batch 500
])
def test_a_file_that_never_finishes_fails_its_row_within_the_limit(mlp_artifacts: Path, tmp_path: Path, name: str,
                                                                  write, step: str, verify_worker: Worker) -> None:
    if name not in {a["name"] for a in json.loads((mlp_artifacts / "manifest.json").read_text())["artifacts"]}:
        pytest.skip(f"the fixture export did not ship {name} (see its manifest's skipped)")
    art, file = _replace(mlp_artifacts, tmp_path, name, write)
    t0 = time.monotonic()
    result = verify(art, replace(FAST, time_limit_s=LIMIT_S), verify_worker)
    assert time.monotonic() - t0 < WALL_S
    _only_failure(result, name, file, f"did not finish within {LIMIT_S:g} s ({step})", "raise --time-limit")
    # stopped once, run no more: no later step (the golden check, timing) spends another limit on it
    assert sum("did not finish" in r for r in row(result, name).reasons) == 1, row(result, name).reasons


def test_cli_time_limit_fails_the_row_and_exits_1(mlp_artifacts: Path, tmp_path: Path) -> None:
    art, file = _replace(mlp_artifacts, tmp_path, "mlp-static-onnx", endless_loop_onnx)
    proc = subprocess.run([sys.executable, "-m", "edgeq", "verify", str(art), "--time-limit", f"{LIMIT_S:g}",
                           "--quiet", "--batch", "32", "--rounds", "1"], capture_output=True, text=True, timeout=WALL_S)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    fails = [line for line in proc.stderr.splitlines() if line.startswith("FAIL ")]
    assert fails == [f"FAIL mlp-static-onnx: {file}: did not finish within {LIMIT_S:g} s (load and accuracy on 1000 "
                     "samples); raise --time-limit or re-run `edgeq export`"]
    assert ", 1 FAIL," in proc.stdout and "time limit 3 s per step" in proc.stdout


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_time_limit_must_be_positive(value: str) -> None:
    result = CliRunner().invoke(verify_command, ["somewhere", "--time-limit", value])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith("edgeq: error: time limit must be a number of seconds > 0 (--time-limit)")


def test_help_names_the_limits() -> None:
    result = CliRunner().invoke(verify_command, ["--help"])
    assert result.exit_code == 0 and "--time-limit SECONDS" in result.output and "--memory-limit GIB" in result.output


# the memory cap -------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the address-space cap reads /proc (Linux)")
def test_an_allocation_above_the_cap_fails_its_row(mlp_artifacts: Path, tmp_path: Path) -> None:
    # 500 samples x 1024 copies x 3 KiB = 1.5 GiB for one accuracy batch; the cap is 1 GiB. (Without the cap
    # it would succeed: small enough not to hurt the machine if the cap ever stops working.)
    art, file = _replace(mlp_artifacts, tmp_path, "mlp-static-onnx", lambda p: huge_tensor_onnx(p, 1024))
    result = verify(art, replace(FAST, memory_limit_gb=1.0, time_limit_s=60.0))
    assert result.memory_cap_gb == 1.0
    _only_failure(result, "mlp-static-onnx", file, "ran out of memory (load and accuracy on 1000 samples",
                  "the cap is 1 GiB of memory; raise --memory-limit")


# the fp32 speed gate --------------------------------------------------------------------------------


def _row(precision: str = "fp32", runtime: str = "onnxruntime-cpu", **ratios: tuple[float, float]) -> Row:
    return Row(name="m-x", model="m", format="onnx", precision=precision, runtime=runtime, role="artifact",
               stage="original", accuracy=0.9, delta_pts=0.0, agreement=1.0, batch=256,
               paired={kind: {"reference": f"m-{kind}", "runtime": "torch-cpu", "ratio_b1": b1, "ratio_batch": bt,
                              "rounds_b1": [b1] * 8, "rounds_batch": [bt] * 8} for kind, (b1, bt) in ratios.items()})


@pytest.mark.parametrize(("r", "expected"), [
    (_row(torch_fp32=(1.9, 1.0)), False),  # within the limit at both batch sizes
    (_row(torch_fp32=(2.1, 0.5)), True),  # slower at batch 1
    (_row(torch_fp32=(0.5, 2.1)), True),  # slower at the large batch
    (_row(ort_fp32=(5.0, 5.0)), None),  # torch vs onnxruntime: legitimately 3-5x, no rule
    (_row(runtime="torch-cuda", torch_fp32=(9.0, 9.0)), None),  # CUDA vs the CPU baseline: no rule
    (_row(precision="int8", torch_fp32=(9.0, 9.0)), None),  # int8 has its own rule (vs its parent)
])
def test_fp32_slowdown_rule(r: Row, expected: bool | None) -> None:
    speed_flags(r, FAST)
    assert r.slower_than_fp32_baseline is expected


def test_fp32_slowdown_warns_or_fails() -> None:
    r = replace(_row(torch_fp32=(3.0, 1.5)), slower_than_fp32_baseline=True)
    warned, failed = replace(r, reasons=[], warnings=[]), replace(r, reasons=[], warnings=[])
    gate(warned, FAST)
    gate(failed, replace(FAST, rounds=8, fail_on_slower=True))
    assert warned.status == "ok" and warned.warnings[0].startswith(f"fp32 is more than {FP32_SLOWDOWN_LIMIT:g}x slower")
    assert failed.status == "FAIL" and "3.00x at batch 1, 1.50x at batch 256" in failed.reasons[0]


def test_a_slowed_fp32_onnx_is_flagged(mlp_artifacts: Path, tmp_path: Path, verify_worker: Worker) -> None:
    # 20,000 loop iterations: milliseconds per call, far beyond FP32_SLOWDOWN_LIMIT x the eager MLP's ~0.1 ms
    art, _ = _replace(mlp_artifacts, tmp_path, "mlp-fp32-onnx", lambda p: slowed_onnx(p, 20_000))
    result = verify(art, replace(FAST, rounds=8), verify_worker)  # 8 rounds: the interval edgeq.policy's rule reads
    slowed = row(result, "mlp-fp32-onnx")
    assert slowed.status == "ok" and slowed.slower_than_fp32_baseline is True  # same logits, only slower
    assert slowed.paired["torch_fp32"]["ratio_b1"] > 2 * FP32_SLOWDOWN_LIMIT
    assert any("fp32 is more than" in w for w in slowed.warnings)
    assert "slowbase" in next(line for line in table(result).splitlines() if line.startswith("mlp-fp32-onnx "))
    report = json.loads(json.dumps(to_json(result)))
    jsonschema.validate(report, REPORT_SCHEMA)
    assert next(r for r in report["rows"] if r["name"] == "mlp-fp32-onnx")["slower_than_fp32_baseline"] is True
    assert report["gates"]["fp32_slowdown_limit"] == FP32_SLOWDOWN_LIMIT
    assert report["measurement"]["time_limit_s"] == FAST.time_limit_s
    failed = replace(slowed, warnings=[])
    gate(failed, replace(FAST, rounds=8, fail_on_slower=True))
    assert failed.status == "FAIL"


def test_family_summary_signs_each_pruning_change_once() -> None:
    from edgeq.verify.report import _families
    groups = [{"group": "conv1", "drop_points": 12.5}, {"group": "fc1", "drop_points": -0.4}]
    text = " ".join(_families({"m": {"max_accuracy_drop": 0.5, "sensitivity": {"pruning": {"groups": groups}}}}))
    assert "conv1 -12.50" in text and "fc1 +0.40" in text and "--" not in text


def test_each_batch_size_is_timed_on_its_own_runner_never_the_accuracy_one(mlp_artifacts: Path, verify_worker) -> None:
    """torch's x86 int8 kernels keep their plan for the first input shape they see: a runner that first ran the
    accuracy pass (or batch 256) ran batch 1 up to 1.8x slower. So the accuracy runner never times, and every
    batch size gets a runner warmed at that size only."""
    from edgeq.manifest import read
    from edgeq.verify.latency import _warm
    from edgeq.verify.rows import Subject, VerifyConfig

    art = read(mlp_artifacts).artifact("mlp-fp32-ts")  # one runner per batch size, whatever the format
    verify_worker.configure(batches={"b1": np.zeros((1, 1, 28, 28), np.float32),
                                     "batch": np.zeros((4, 1, 28, 28), np.float32)}, threads=1)
    s = Subject(_row("int8", "torch-cpu"), art, "cpu", path=mlp_artifacts / art.file)
    s.runner = verify_worker.define(s.path, art.format, "cpu", 1, None)
    assert _warm(s, VerifyConfig(), verify_worker)
    assert set(s.timers) == {"b1", "batch"} and len({*s.timers.values(), s.runner}) == 3
    verify_worker.reset()
