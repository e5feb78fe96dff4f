"""The verify worker runs files confined (edgeq.limits.confine: Linux Landlock), and verify reads its replies as
data only. Real kernel rules, a real worker process, real pipes: nothing is mocked."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgeq import limits

ROOT = Path(__file__).resolve().parents[1]

# A confined child that tries, after confine(), what a file that took over a runtime would try.
ATTEMPTS = r"""
import json, os, socket, sys
from edgeq import limits
inside, outside, victim, port, parent = sys.argv[1:6]
out = {"confined": limits.confine(("/dev/null", "/dev/shm", inside))}
def attempt(name, fn):
    try:
        fn(); out[name] = "done"
    except OSError as exc:
        out[name] = exc.errno
attempt("create outside", lambda: open(os.path.join(outside, "new"), "w").close())
attempt("truncate outside", lambda: open(victim, "r+").truncate(0))
attempt("append outside", lambda: open(victim, "a").write("x"))
attempt("remove outside", lambda: os.unlink(victim))
attempt("rename outside", lambda: os.rename(victim, victim + ".moved"))
attempt("make a directory outside", lambda: os.mkdir(os.path.join(outside, "dir")))
attempt("create inside", lambda: open(os.path.join(inside, "new"), "w").write("x"))
attempt("write /dev/null", lambda: open("/dev/null", "w").write("x"))
attempt("read outside", lambda: open(victim).read())
attempt("connect", lambda: socket.create_connection(("127.0.0.1", int(port)), timeout=5).close())
attempt("signal the parent", lambda: os.kill(int(parent), 0))
attempt("open a UDP socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
attempt("open a unix socket", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
attempt("write /dev/shm", lambda: (open("/dev/shm/edgeq-confine-test-%d" % os.getpid(), "w").close(),
                                   os.unlink("/dev/shm/edgeq-confine-test-%d" % os.getpid())))
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
s = ort.InferenceSession(helper.make_model(g).SerializeToString(), providers=["CPUExecutionProvider"])
out["onnxruntime"] = s.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist()
print(json.dumps(out))
"""


def _landlock_or_skip() -> None:
    probe = subprocess.run([sys.executable, "-c", "from edgeq import limits; print(limits.confine(())['landlock'])"],
                           capture_output=True, text=True, cwd=ROOT, check=True)
    if probe.stdout.strip() == "None":
        pytest.skip("this kernel has no Landlock: edgeq.limits.confine leaves the process as it is")


def test_a_confined_process_writes_only_where_allowed_connects_nowhere_and_signals_no_one(tmp_path: Path) -> None:
    _landlock_or_skip()
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir(), outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        p = subprocess.run([sys.executable, "-c", ATTEMPTS, str(inside), str(outside), str(victim),
                            str(server.getsockname()[1]), str(os.getpid())],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    abi = out["confined"]["landlock"]
    for refused in ("create outside", "append outside", "remove outside", "rename outside", "make a directory outside"):
        assert out[refused] == 13, (refused, out)  # EACCES
    if abi >= 3:
        assert out["truncate outside"] == 13, out
    if abi >= 4 or out["confined"]["sockets"] == "none opened (seccomp)":
        assert out["connect"] in (1, 13), out  # no socket (seccomp: EPERM) or no TCP connect (Landlock: EACCES)
    if abi >= 6:
        assert out["signal the parent"] == 1, out  # EPERM
    if out["confined"]["sockets"] == "none opened (seccomp)":
        assert out["open a UDP socket"] == out["open a unix socket"] == 1, out  # EPERM: outside Landlock's reach
    assert out["create inside"] == out["write /dev/null"] == out["write /dev/shm"] == out["read outside"] == "done", out
    assert out["onnxruntime"] == [0.0, 2.0]
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"] and victim.read_text() == "keep me"
    assert (inside / "new").read_text() == "x"


def test_the_verify_worker_is_confined_and_the_report_says_so(mlp_artifacts: Path, tmp_path: Path) -> None:
    """The worker confines itself before it imports a runtime, checks that it can no longer create a file,
    and the report carries both."""
    _landlock_or_skip()
    from edgeq.verify.worker import Worker, _gpu_devices

    if _gpu_devices():
        pytest.skip("a GPU device is here: the worker leaves its files unconfined (edgeq.verify.worker._gpu_devices)")
    with Worker(2.0) as worker:
        confinement = worker.info["confinement"]
        assert confinement["files"].startswith("none written") and "/dev/null" in confinement["files"], confinement
        assert confinement["sockets"] == "none opened (seccomp)", confinement
        assert confinement["checked"].endswith("was refused: Permission denied (errno 13)"), confinement
        pid = worker._proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status  # Landlock's precondition, set in the worker only
    assert "NoNewPrivs:\t0" in Path("/proc/self/status").read_text()  # verify's own process is untouched
    report = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "edgeq", "verify", str(mlp_artifacts), "--rounds", "1",
                        "--json", str(report)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "sandbox: the files ran in a worker confined by Landlock" in " ".join(p.stdout.split())
    assert json.loads(report.read_text())["environment"]["worker_confinement"]["landlock"] >= 1


class _Makes:
    """Unpickled, it would create a directory: what a taken-over worker could send back."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


# A child that speaks the worker's protocol but sends a hostile pickle as its hello.
HOSTILE_CHILD = r"""
import os, sys
os.write(1, bytes.fromhex(sys.argv[1]))
sys.stdin.read()
"""


def test_verify_reads_the_workers_replies_as_data_only(tmp_path: Path, monkeypatch) -> None:
    import numpy as np

    from edgeq.errors import EdgeqError
    from edgeq.verify import worker as w

    made = tmp_path / "made-by-the-reply"
    hostile = pickle.dumps(("ok", {"cuda": False, "x": _Makes(made)}), protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(w.NotData, match="os.makedirs"):
        w._reply(hostile)
    arrays = ("ok", {"logits": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int64(3), "t": [0.5, 1.5]})
    back = w._reply(pickle.dumps(arrays, protocol=pickle.HIGHEST_PROTOCOL))
    assert back[1]["logits"].tolist() == arrays[1]["logits"].tolist() and back[1]["n"] == 3
    for odd in (b"not a pickle", pickle.dumps("ok"), pickle.dumps(("shell", "x")), pickle.dumps(("error", 3))):
        with pytest.raises(w.NotData):
            w._reply(odd)

    frames = {"os.makedirs": len(hostile).to_bytes(8, "big") + hostile,  # the worker's framing: length, pickle
              "a reply of 18446744073709551615 bytes": b"\xff" * 8}
    for needle, frame in frames.items():
        def start(self, frame=frame) -> None:  # the real pipes, a child that answers with the hostile frame
            self._proc = subprocess.Popen([sys.executable, "-c", HOSTILE_CHILD, frame.hex()], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self._hello = None

        monkeypatch.setattr(w.Worker, "_start", start)
        with w.Worker(1.0) as worker, pytest.raises(EdgeqError, match=f"did not start .*{needle}") as err:
            worker.info
        assert "\n" not in str(err.value)
    assert not made.exists()


def _write_outside(path: str):
    def fn(confinement: dict) -> dict:
        try:
            open(path, "w").close()
            return {"errno": 0, "confinement": confinement}
        except OSError as exc:
            return {"errno": exc.errno, "confinement": confinement}
    return fn


def test_a_confined_child_returns_json_and_its_errors_and_its_death_are_one_line(tmp_path: Path) -> None:
    import signal

    from edgeq.device.read import DeviceError
    from edgeq.errors import EdgeqError

    _landlock_or_skip()
    outside = tmp_path / "outside.txt"
    got = limits.in_confined_child(_write_outside(str(outside)))
    assert got["errno"] == 13 and not outside.exists(), got  # refused in the child
    open(outside, "w").close()  # and still allowed here: only the child gave its rights up
    assert got["confinement"]["checked"].endswith("Permission denied (errno 13)")

    def raises(_):
        raise DeviceError("manifest.json: damaged; copy the export again")

    with pytest.raises(DeviceError, match="^manifest.json: damaged; copy the export again$"):
        limits.in_confined_child(raises)
    with pytest.raises(EdgeqError, match=r"died \(signal SIGKILL\) before it reported"):  # the OOM killer's
        limits.in_confined_child(lambda _: os.kill(os.getpid(), signal.SIGKILL))
    def holds_the_lock(_):  # an ExecuTorch call keeps Python's lock as this does: no thread of the child runs
        import ctypes

        limits.WATCH[0].begin(limits.WATCH[0].name("model.pte"), 0.5, 1)
        ctypes.PyDLL(None).sleep(60)
        return {}

    with pytest.raises(limits.GaveUp) as gave_up:  # the parent stops it, from the page they share
        limits.in_confined_child(holds_the_lock, watch=limits.Watch())
    assert gave_up.value.value == {"file": "model.pte", "limit_s": 0.5, "step": "a call"}
    with pytest.raises(EdgeqError, match="more than 64 MiB"):
        limits.in_confined_child(lambda _: {"x": "y" * (limits.MAX_REPLY_BYTES + 1)})
    for i, odd in enumerate((b"[" * 200_000, b'{"value": 1', b'["value"]')):  # what a taken-over child could send
        sent = tmp_path / f"reply-{i}"
        sent.write_bytes(odd)
        r = os.open(sent, os.O_RDONLY)
        try:
            with pytest.raises(EdgeqError, match="sent back something it never sends"):
                limits._read_reply(r, os.getpid())
        finally:
            os.close(r)


def test_what_a_confined_child_prints_reaches_stderr_only_and_bounded(capfd) -> None:
    """The device checker's child runs files that may print without end (a TorchScript `print`, a runtime's
    log): its stdout and stderr are one pipe the checker drains, passing on the first OUTPUT_FORWARDED bytes as
    they come and, at the end, the last OUTPUT_TAIL. Nothing reaches the checker's stdout, where its report goes;
    before, the child wrote straight to both."""
    import signal

    from edgeq.errors import EdgeqError

    flood = limits.OUTPUT_FORWARDED + 8 * limits.OUTPUT_TAIL

    def prints(_):
        print("a log line", flush=True)  # the child's stdout
        view = memoryview(b"x" * flood)
        while view:  # as a file that prints without end: far more than is passed on
            view = view[os.write(2, view):]
        os.write(1, b"last words\n")
        return {"value": 7}

    assert limits.in_confined_child(prints) == {"value": 7}
    out, err = capfd.readouterr()
    assert out == "", out[:200]
    assert err.startswith("a log line\n") and err.endswith("x" * 1000 + "last words\n"), (err[:100], err[-100:])
    left_out = flood + len("a log line\nlast words\n") - limits.OUTPUT_FORWARDED - limits.OUTPUT_TAIL
    said = f"\n[{left_out} bytes of the checking process's output left out; its last {limits.OUTPUT_TAIL} follow]\n"
    assert err[limits.OUTPUT_FORWARDED:].startswith(said)  # on a line of its own, right after what was passed on
    assert len(err) == limits.OUTPUT_FORWARDED + len(said) + limits.OUTPUT_TAIL

    def dies(_):
        os.write(2, b"what it said before it died\n")
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(EdgeqError, match=r"died \(signal SIGKILL\)"):
        limits.in_confined_child(dies)
    out, err = capfd.readouterr()
    assert out == "" and err == "what it said before it died\n", (out, err)


def test_the_device_checker_runs_the_files_in_a_confined_child(mlp_artifacts: Path, tmp_path: Path) -> None:
    """The checker's own process keeps its rights (it writes the report, removes its copy); the files run in a
    child that gave up writing, connecting and signalling, and the report says so."""
    _landlock_or_skip()
    report = tmp_path / "check.json"
    p = subprocess.run([sys.executable, "-m", "edgeq.device", "check", str(mlp_artifacts), "--rounds", "0",
                        "--json", str(report)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "sandbox: the files ran in a child process confined by Landlock" in p.stdout
    r = json.loads(report.read_text())
    assert r["passed"] and r["runtime"]["confinement"]["files"].startswith("none written"), r["runtime"]
    assert r["runtime"]["confinement"]["checked"].endswith("was refused: Permission denied (errno 13)")
    assert sum(f["status"] == "ok" for f in r["files"]) >= 4  # the MLP's ONNX and TorchScript files ran in it


# A child that says hello as the worker does, then never answers again (a runtime's teardown that never ends).
SILENT_CHILD = r"""
import os, pickle, sys
hello = pickle.dumps(("ok", {"cuda": False, "cuda_name": None, "providers": ["CPUExecutionProvider"],
                             "cap_gb": None, "confinement": {"landlock": None, "why": "test"}}))
os.write(1, len(hello).to_bytes(8, "big") + hello)
sys.stdin.buffer.read()
"""


def test_a_worker_that_stops_answering_cannot_hold_verify(monkeypatch) -> None:
    """configure, drop and reset run no file's computation, but a runtime's teardown or a taken-over child can
    still never answer them: they have a limit, the child is stopped, and the next call gets a fresh one."""
    import threading

    import numpy as np

    from edgeq.verify import worker as w

    monkeypatch.setattr(w, "HOUSEKEEPING_LIMIT_S", 0.5)
    started = []

    def start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", SILENT_CHILD], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._hello = None
        started.append(self._proc)

    monkeypatch.setattr(w.Worker, "_start", start)
    done = []
    with w.Worker(1.0) as worker:
        def housekeeping() -> None:
            worker.info  # hello
            worker.configure(x=np.zeros((2, 3), np.float32))  # never answered: stopped after the limit
            done.append(worker._proc)

        thread = threading.Thread(target=housekeeping, daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "configure waited on a child that never answers"
    assert done == [None] and len(started) == 1 and started[0].poll() is not None  # stopped, not replaced yet


def test_with_the_settings_allowlist_off_the_confined_child_still_stops_the_memory_stats_attack(
        mlp_artifacts: Path, tmp_path: Path, monkeypatch) -> None:
    """Defence in depth: round 4's onnxruntime attack (a setting that makes it write the file it names), with
    edgeq.runtime's allowlist switched off so that onnxruntime gets the setting. Unconfined, the file is
    written; in the device checker's confined child, it is not."""
    import shutil

    from edgeq import runtime
    from edgeq.device.check import CheckConfig, check

    _landlock_or_skip()
    art = tmp_path / "art"
    shutil.copytree(mlp_artifacts, art)
    manifest = json.loads((art / "manifest.json").read_text())
    victims = {}
    for a in manifest["artifacts"]:
        if a["format"] == "onnx":
            victims[a["name"]] = tmp_path / f"victim-{a['name']}.txt"
            a["runtime"]["session_options"] = {"config_entries": {
                "session.collect_node_memory_stats_to_file": str(victims[a["name"]])}}
    (art / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(runtime, "session_options_problem", lambda options: None)  # the allowlist, off

    check(art, CheckConfig(rounds=0))  # confined
    assert victims and not any(v.exists() for v in victims.values())

    monkeypatch.setattr(limits, "confine", lambda *a, **k: {"landlock": None, "why": "switched off"})
    check(art, CheckConfig(rounds=0))  # the same check, unconfined: the attack is real
    assert all(v.exists() for v in victims.values()), victims


class _Endless(__import__("torch").nn.Module):
    """A TorchScript program edgeq.scripted lets through (aten and prim operators only) that never returns."""

    def forward(self, x):
        y = x
        while bool(y.sum() > -1.0):
            y = y + 1.0
        return y


def test_a_torchscript_file_that_never_returns_fails_its_row_and_the_others_are_checked(
        mlp_artifacts: Path, tmp_path: Path) -> None:
    """TorchScript cannot stop a call. The checker's confined child gives up past --time-limit and names the
    file; the check runs again without it, and every other file is checked."""
    import hashlib
    import shutil

    import torch

    art = tmp_path / "art"
    shutil.copytree(mlp_artifacts, art)
    manifest = json.loads((art / "manifest.json").read_text())
    ts = next(a for a in manifest["artifacts"] if a["format"] == "torchscript" and a["precision"] == "fp32")
    torch.jit.save(torch.jit.script(_Endless()), str(art / ts["file"]))
    data = (art / ts["file"]).read_bytes()
    ts["bytes"], ts["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (art / "manifest.json").write_text(json.dumps(manifest))
    report = tmp_path / "check.json"
    p = subprocess.run([sys.executable, "-m", "edgeq.device", "check", str(art), "--rounds", "0", "--time-limit", "2",
                        "--json", str(report)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stdout + p.stderr
    r = json.loads(report.read_text())
    files = {f["name"]: f for f in r["files"]}
    hung = files[ts["name"]]
    assert hung["status"] == "failed", hung
    assert "did not finish within 2 s (a call; --time-limit)" in hung["problems"][0], hung
    others = [f for name, f in files.items() if name != ts["name"] and f["format"] in ("onnx", "torchscript")]
    assert others and all(f["status"] == "ok" for f in others if f["format"] == "onnx"), others
    assert [line for line in p.stdout.splitlines() if line.startswith("FAIL")] == \
        [f"FAIL {ts['file']} ({ts['name']}): {hung['problems'][0]}"], p.stdout


def test_a_file_that_prints_without_end_costs_verify_neither_disk_nor_memory(tmp_path: Path) -> None:
    """A TorchScript file may `print` (to the worker's stdout, which the worker sends to its stderr). That stderr
    went to a temporary file, as large as the file printed for as long as its row ran, and was read whole into
    verify's memory when the worker died. It is a pipe now, drained into its last STDERR_TAIL bytes: the line
    that says how the worker died is still there."""
    import signal
    import stat
    import tracemalloc

    import numpy as np
    import torch

    from edgeq.verify.worker import STDERR_TAIL, Budget, Failed, Worker

    class Prints(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i in range(20000):  # about 2 MB a call
                print("printed by the file", i, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")
            return torch.zeros(x.shape[0], 10)

    path = tmp_path / "prints.pt"
    torch.jit.save(torch.jit.script(Prints()), str(path))
    with Worker(None) as worker:
        worker.configure(x=np.zeros((2, 1, 28, 28), np.float32))
        handle = worker.define(path, "torchscript", "cpu", 1, None)
        for _ in range(5):
            assert worker.predict(handle, Budget(120.0)).shape == (2, 10)
        pid = worker._proc.pid
        stderr = os.stat(f"/proc/{pid}/fd/2")
        assert stat.S_ISFIFO(stderr.st_mode), f"the worker's stderr is a file of {stderr.st_size} bytes"
        os.kill(pid, signal.SIGKILL)  # dies as the out-of-memory killer would stop it
        tracemalloc.start()
        try:
            with pytest.raises(Failed) as died:
                worker.predict(handle, Budget(120.0))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert died.value.kind == "crash" and died.value.detail.startswith("killed by SIGKILL: printed by the file")
    assert peak < 16 * STDERR_TAIL, f"{peak} bytes to read how the worker died"  # about 10 MB were printed
