"""Hardening, fourth round: what a bundle's files and manifest make the runtimes do. A manifest may carry
onnxruntime settings, and onnxruntime has settings that write files; a TorchScript file is a program, and torch
has operators that write files. `edgeq verify` and `python -m edgeq.device check` take only the settings edgeq
writes (edgeq.runtime.SESSION_CONFIG_ENTRIES) and run only TorchScript a traced model is made of
(edgeq.scripted). Each test plants the attack in a real export and asserts that nothing outside it is written.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgeq import runtime
from edgeq.errors import IntegrityError
from edgeq.verify import verify
from test_hardening2 import ROOT, FAST, cli, copy, env, keys, one_line_error, rehash, tiny, user, wait_for  # noqa: F401
from test_hardening3 import device, device_py, manifest, no_traceback, save  # noqa: F401


def _set_session_options(art: Path, options: dict) -> None:
    m = manifest(art)
    for a in m["artifacts"]:
        if a["format"] == "onnx":
            a["runtime"]["session_options"] = options
    save(art, m)


@pytest.mark.parametrize("options, needle", [
    ({"config_entries": {"session.collect_node_memory_stats_to_file": "VICTIM"}},
     "session.collect_node_memory_stats_to_file"),
    ({"graph_optimization_level": "__class__"}, "graph_optimization_level"),
    ({"optimized_model_filepath": "VICTIM"}, "optimized_model_filepath"),
], ids=["memory-stats-file", "optimization-level", "unknown-setting"])
def test_onnxruntime_settings_edgeq_never_writes_fail_the_row_and_write_nothing(
        tiny: Path, tmp_path: Path, options: dict, needle: str, verify_worker, device_py: Path) -> None:
    """onnxruntime writes its node memory statistics to the file the setting names, truncating it, with the
    model's node names in it (a line of a shell file, where the attacker names the nodes)."""
    art, victim = copy(tiny, tmp_path / "art"), tmp_path / "victim.txt"
    _set_session_options(art, json.loads(json.dumps(options).replace("VICTIM", str(victim))))
    result = verify(art, FAST, verify_worker)
    assert not result.passed
    onnx_rows = [r for r in result.rows if r.format == "onnx" and r.runtime == "onnxruntime-cpu"]
    assert onnx_rows and all(r.status == "FAIL" for r in onnx_rows), result.failures
    assert {r.status for r in result.rows if r.format != "onnx"} <= {"ok", "skipped"}, result.failures
    assert all(needle in " ".join(r.reasons) for r in onnx_rows), result.failures
    r = device("check", art, "--rounds", "0", python=device_py)
    no_traceback(r)
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert r.exit_code == 1 and fails and all(needle in line for line in fails), r.output
    assert not victim.exists()


def test_the_settings_edgeq_writes_are_taken() -> None:
    ok = {"config_entries": {"session.intra_op.allow_spinning": "0"}, "graph_optimization_level": "ORT_ENABLE_ALL"}
    assert runtime.session_options_problem(ok) is None and runtime.session_options_problem({}) is None
    assert "0" in runtime.session_options_problem({"config_entries": {"session.intra_op.allow_spinning": "2"}})


class _Writes(torch.nn.Module):
    """Returns its input unchanged, after writing PAYLOAD into `target` (torch.from_file maps it read-write and
    creates it): outputs, accuracy and agreement are all the traced model's."""

    def __init__(self, inner, target: str):
        super().__init__()
        self.inner, self.target = inner, target
        self.register_buffer("payload", torch.frombuffer(bytearray(b"echo planted\n"), dtype=torch.uint8).clone())

    def forward(self, x):
        mapped = torch.from_file(self.target, True, self.payload.numel(), dtype=torch.uint8)
        mapped.copy_(self.payload)
        return self.inner(x) + mapped.sum().float() * 0.0


def test_a_torchscript_file_that_writes_a_file_is_refused_before_it_runs(
        tiny: Path, tmp_path: Path, verify_worker, device_py: Path) -> None:
    art, victim = copy(tiny, tmp_path / "art"), tmp_path / "victim.sh"
    ts = next(a for a in manifest(art)["artifacts"] if a["format"] == "torchscript")
    planted = torch.jit.script(_Writes(torch.jit.load(str(art / ts["file"])), str(victim)))
    planted(torch.zeros(1, *manifest(art)["input"]["shape"][1:]))  # it does write, where nothing checks it
    assert victim.read_bytes() == b"echo planted\n"
    victim.unlink()
    torch.jit.save(planted, str(art / ts["file"]))
    rehash(art, ts["file"])
    result = verify(art, FAST, verify_worker)
    refused = {r.name for r in result.rows if r.status == "FAIL" and "aten::from_file" in " ".join(r.reasons)}
    # the file itself, and the checkpoint whose weights run in it (its graph)
    assert refused == {ts["name"], ts["name"].replace("-ts", "-ckpt")}, result.failures
    r = device("check", art, "--rounds", "0", python=sys.executable)  # where torch imports, it runs TorchScript
    no_traceback(r)
    assert r.exit_code == 1 and any("aten::from_file" in line for line in r.stdout.splitlines()
                                    if line.startswith(f"FAIL {ts['file']}")), r.output
    assert not victim.exists()


class _Restores(torch.nn.Module):
    """A scripted module whose __setstate__ (run by torch.jit.load itself) writes a file."""

    def __init__(self, target: str):
        super().__init__()
        self.target, self.mapped = target, torch.zeros(4, dtype=torch.uint8)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self):
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.target = state[0]
        self.training = state[1]
        self.mapped = torch.from_file(self.target, True, 4, dtype=torch.uint8)
        self.mapped.fill_(65)


def test_a_torchscript_setstate_is_refused_before_loading_runs_it(tmp_path: Path) -> None:
    victim, path = tmp_path / "victim", tmp_path / "model.ts.pt"
    torch.jit.save(torch.jit.script(_Restores(str(victim))), str(path))
    torch.jit.load(str(path))  # torch's own load runs it
    assert victim.read_bytes() == b"AAAA"
    victim.unlink()
    with pytest.raises(IntegrityError, match="defines __setstate__, which loading would run"):
        runtime.load_torchscript(path)
    assert not victim.exists()


def _contract_bar(m: dict) -> None:
    a = next(a for a in m["artifacts"] if a.get("contract"))
    a["contract"]["bars"] = [{"relative_to": [1], "max_drop_points": 0.5, "drop_points": 0.0}]


@pytest.mark.parametrize("edit, where", [
    (lambda m: m["environment"].update(cpu="x"), "environment/cpu"),
    (lambda m: m["models"]["user"].update(max_accuracy_drop="x"), "models/user/max_accuracy_drop"),
    (_contract_bar, "bars/0/relative_to"),
    (lambda m: m["golden"].pop("input"), "'input' is a required property"),
    (lambda m: m["golden"].pop("outputs"), "'outputs' is a required property"),
    (lambda m: m["input"].update(shape=None), "input/shape"),
], ids=["cpu-a-string", "bar-a-string", "bar-against-a-list", "golden-without-input", "golden-without-outputs",
        "input-shape-null"])
def test_hostile_manifest_values_are_one_line_not_a_traceback(tiny: Path, tmp_path: Path, edit, where: str,
                                                              device_py: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    m = manifest(art)
    edit(m)
    save(art, m)
    assert where in one_line_error(cli("verify", art, "--quiet", "--rounds", "1"))
    no_traceback(device("check", art, "--rounds", "0", "--accuracy", python=device_py))


def _endless(path: Path) -> None:
    """The ONNX file's logits plus 0 * (a Loop of 10^15 steps): the same answers, after forever."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    out = g.output[0].name
    for node in g.node:
        node.output[:] = [f"{out}_base" if o == out else o for o in node.output]
    scalar = lambda name, kind: helper.make_tensor_value_info(name, kind, [])  # noqa: E731
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body", [scalar("i", TensorProto.INT64), scalar("cond_in", TensorProto.BOOL), scalar("v_in", TensorProto.FLOAT)],
        [scalar("cond_out", TensorProto.BOOL), scalar("v_out", TensorProto.FLOAT)],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    g.initializer.extend([numpy_helper.from_array(np.array(10**15, np.int64), "trips"),
                          numpy_helper.from_array(np.array(True), "go"),
                          numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    g.node.extend([helper.make_node("ReduceSum", [g.input[0].name], ["s"], keepdims=0),
                   helper.make_node("Loop", ["trips", "go", "s"], ["v"], body=body),
                   helper.make_node("Mul", ["v", "zero"], ["nothing"]),
                   helper.make_node("Add", [f"{out}_base", "nothing"], [out])])
    del g.value_info[:]
    onnx.save(model, str(path))


def test_sigterm_stops_the_device_checker_inside_a_runtime_that_never_returns(
        tiny: Path, tmp_path: Path, device_py: Path) -> None:
    """onnxruntime runs the Loop in its own code, where Python's handler for the signal never gets to raise:
    the checker still stops, exits 130 with its one line and leaves no private copy behind."""
    art, tmpdir = copy(tiny, tmp_path / "art"), tmp_path / "tmp"
    tmpdir.mkdir()
    _endless(art / "user-fp32.onnx")
    rehash(art, "user-fp32.onnx")
    p = subprocess.Popen([str(device_py), "-m", "edgeq.device", "check", str(art), "--rounds", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**env(), "TMPDIR": str(tmpdir)}, cwd=ROOT)
    try:
        wait_for(lambda: any(tmpdir.glob("edgeq-device-*/user-fp32.onnx")))  # copied: it runs the files next
        time.sleep(1.0)  # into the Loop (were the signal earlier, the usual KeyboardInterrupt ends it the same way)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)  # without the watch it never ends
    finally:
        p.kill()
    assert p.returncode == 130 and err.strip().splitlines()[-1].startswith("edgeq: interrupted"), out + err
    assert "Traceback" not in err and not list(tmpdir.glob("edgeq-device-*"))


def _bytes_read() -> int:
    """What this process has read so far through read(2) (Linux's /proc/self/io `rchar`): a count, not a time."""
    line = next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar:"))
    return int(line.split()[1])


@pytest.mark.parametrize("name, verify_says, device_says", [
    ("zzz.bin", "added after it was signed", "not covered by the signature"),
    ("user-fp32.onnx", "changed since it was signed", "changed since signing"),
], ids=["added-beside", "replacing-a-signed-file"])
def test_a_sparse_file_in_a_signed_export_is_refused_without_reading_it(
        tiny: Path, keys: dict[str, Path], tmp_path: Path, name: str, verify_says: str, device_says: str,
        verify_worker, device_py: Path) -> None:
    """1 TiB that occupies nothing, beside the signed files or in place of one: the private copy skips its
    holes, the signed statement's names are compared before anything is hashed, and a signed file's size is
    the signed manifest's, so it costs neither tool a read of its apparent size."""
    from dataclasses import replace

    from edgeq.errors import SignatureError
    from edgeq.signing import sign_directory

    art = copy(tiny, tmp_path / "art")
    sign_directory(art, keys["key"])
    (art / name).unlink(missing_ok=True)
    with open(art / name, "wb") as f:
        f.truncate(1 << 40)
    before = _bytes_read()
    with pytest.raises(SignatureError, match=re.escape(f"{name}: {verify_says}")):
        verify(art, replace(FAST, public_key=str(keys["pub"])), verify_worker)
    assert _bytes_read() - before < 1 << 30
    r = device("check", art, "--public-key", keys["pub"], "--rounds", "0", python=device_py)
    no_traceback(r)
    assert r.exit_code == 1 and f"{name}: {device_says}" in r.output, r.output


def test_the_device_checker_stops_an_onnx_call_past_its_time_limit_and_goes_on(
        tiny: Path, tmp_path: Path, device_py: Path) -> None:
    """onnxruntime's RunOptions.terminate, set by the checker's watch when a call outlives --time-limit: the
    file fails in one line, the others are still checked, and the check ends by itself."""
    art = copy(tiny, tmp_path / "art")
    _endless(art / "user-fp32.onnx")
    rehash(art, "user-fp32.onnx")
    r = device("check", art, "--rounds", "0", "--time-limit", "2", python=device_py, timeout=600)
    no_traceback(r)
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert r.exit_code == 1 and len(fails) == 1 and fails[0].startswith("FAIL user-fp32.onnx") and \
        "did not finish within 2 s (--time-limit)" in fails[0], r.output
    assert "terminate flag" not in r.output  # the one line, not onnxruntime's log of it
    bad = device("check", art, "--time-limit", "-1", python=device_py)
    assert bad.exit_code == 1 and "--time-limit" in bad.stderr and "Traceback" not in bad.output, bad.output
