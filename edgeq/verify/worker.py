"""Artifacts run in a child process that verify can kill: every step has a time limit and a memory cap.

A file can be hostile: an ONNX `Loop` of 10^15 iterations, a TorchScript `while` that never ends, a
graph whose optimisation or output needs more memory than the machine has. onnxruntime can cancel a
running `sess.run` (RunOptions.terminate) but not a session being created, and nothing interrupts a
TorchScript module or `torch.jit.load` in-process; a child process can always be killed. One
long-lived child loads and runs every artifact, for the accuracy pass and for latency, so paired
timing still compares runners in one process, and importing torch happens once (1-4 s), overlapped
with the parent's integrity check and test split. A call that outlives its budget kills the child;
the next call starts a fresh one, which reloads only the runners it is asked for.

The child caps its own memory (RLIMIT_DATA, edgeq.limits.cap_memory) once torch and onnxruntime (and,
for a bundle with programs, ExecuTorch's runtime) are imported, except when CUDA is available: the CUDA
driver maps far more than it uses. The caller loads one file at a time and drops it (verify's core and
latency), so the cap is what one file, or one timed row, may take.

POSIX only (select on pipes, resource limits). The parent starts the child as
`python -c "...; main()" GIB|none PARENT_PID [pte]`, with edgeq's own directory first on sys.path.
"""

from __future__ import annotations

import gc
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq.limits import OUTPUT_TAIL, OutputTail, physical_memory_gb

HOUSEKEEPING_LIMIT_S = 120.0  # new inputs (the test split), a runner dropped: seconds at most, unless a file hangs it
STARTUP_LIMIT_S = 120.0  # importing torch and onnxruntime: 1-4 s on a 2-core VM; no artifact code runs yet
STDERR_TAIL = OUTPUT_TAIL  # bytes of the child's stderr kept (edgeq.limits.OutputTail): its last lines say how it died
# The default memory cap, as a share of physical memory: the memory the worker may add after its
# imports, for all artifacts together (they stay loaded for paired timing, one runner per batch size).
# Verifying the 36 real MLP/CNN artifacts added 1.1 GiB with one runner each; half the machine leaves
# room for that several times over and keeps the other half for everything else.
DEFAULT_MEMORY_SHARE = 0.5
_HEADER = struct.Struct(">Q")
_ALLOCATION = re.compile(r"fail\w* to allocate|can't allocate|cannot allocate|bad_alloc|out of memory", re.I)
REEXPORT = "re-run `edgeq export`"


@dataclass
class Budget:
    """Seconds one step (load and accuracy, warm-up, a row's timing) may spend in the worker, over its calls."""

    seconds: float
    spent: float = 0.0

    @property
    def left(self) -> float:
        return self.seconds - self.spent


class Failed(Exception):
    """A worker call that did not return a result.

    kind: "timeout" (budget spent; the worker was killed), "memory" (an allocation failed), "crash"
    (the worker died), "edgeq" (an EdgeqError; detail is its message) or "error" (a runtime's own error).
    """

    def __init__(self, kind: str, detail: str, limit_s: float | None = None, cap_gb: float | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.limit_s, self.cap_gb = kind, detail, limit_s, cap_gb

    def reason(self, file: str, step: str) -> str:
        """One line for the artifact's row, naming the file, the step and the fix."""
        match self.kind:
            case "timeout":
                return f"{file}: did not finish within {self.limit_s:g} s ({step}); raise --time-limit or {REEXPORT}"
            case "memory":
                cap = f"the cap is {self.cap_gb:g} GiB of memory; raise --memory-limit or " * bool(self.cap_gb)
                return f"{file}: ran out of memory ({step}: {self.detail}); {cap}{REEXPORT}"
            case "crash":
                return f"{file}: crashed its runtime ({step}: {self.detail}); {REEXPORT}"
            case "edgeq":
                return self.detail
        return f"{file}: fails during {step} ({self.detail}); {REEXPORT}"


def default_memory_limit_gb() -> float:
    """DEFAULT_MEMORY_SHARE of this machine's physical memory, in GiB."""
    return round(DEFAULT_MEMORY_SHARE * physical_memory_gb(), 1)


class Worker:
    """The parent's handle on the child: runners by handle, reloaded after a restart; a context manager.

    `define` registers how to load a runner (nothing runs yet); `predict`, `warm` and `window` load it
    in the current child if needed, charging the load to the caller's budget.
    """

    def __init__(self, memory_limit_gb: float | None, programs: bool = False) -> None:
        self._memory_limit_gb = memory_limit_gb
        self._programs = programs  # import ExecuTorch's runtime before the cap: it takes 140 MiB once
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._hello: dict | None = None
        self._specs: dict[int, tuple] = {}
        self._loaded: set[int] = set()
        self._warm: set[int] = set()
        self._state: dict[str, Any] = {}
        self.restarts = 0
        self._start()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def info(self) -> dict:
        """What the child found: cuda (bool), cuda_name, providers, cap_gb (None: memory not capped), confinement
        (edgeq.limits.confine's account of what the child may no longer do)."""
        self._ready()
        assert self._hello is not None
        return self._hello

    def configure(self, **state: Any) -> None:
        """Set the child's inputs (x: the test split; inputs: name -> array, as `predict(on=name)` reads them;
        batches: name -> array, for timing) or torch threads (threads)."""
        self._state.update(state)
        if self._hello is None:
            self._ready()  # a new child: the whole state is replayed
        else:
            self._housekeeping(("configure", state))

    def define(self, path: Path, fmt: str, device: str, threads: int, options: dict | None) -> int:
        handle = len(self._specs)
        self._specs[handle] = (str(path), fmt, device, threads, options)
        return handle

    def predict(self, handle: int, budget: Budget, batch: int | None = None, on: str = "x") -> Any:
        """Logits of the runner (loading it first if needed) on the configured inputs `on` ("x", or a name in
        the configured `inputs`), in calls of `batch` samples (default: the exporter's, Runner.predict)."""
        self._load(handle, budget)
        return self._call(("predict", handle, batch or 0, on), budget)

    def tensor(self, root: Path, item: dict, what: str, max_bytes: int, budget: Budget) -> Any:
        """A golden file's array (edgeq.golden.read_listed), read and parsed in the child, under its memory cap:
        the parent reads no golden file."""
        return self._call(("tensor", str(root), item, what, max_bytes), budget)

    def warm(self, handle: int, calls: int, budget: Budget, batch: str | None = None) -> None:
        """Load the runner if needed and call it `calls` times at the named configured batch (at every
        one if None), untimed."""
        self._load(handle, budget)
        if handle not in self._warm:
            self._call(("warm", handle, calls, batch), budget)
            self._warm.add(handle)

    def window(self, handle: int, batch: str, window_s: float, warm_calls: int, budget: Budget) -> list[float]:
        """Per-call seconds of one timing window of the runner on the named batch (warmed at it first if needed)."""
        self.warm(handle, warm_calls, budget, batch)
        return self._call(("window", handle, batch, window_s), budget)

    def drop(self, handle: int) -> None:
        """Unload one runner in the child (it is loaded again if used again)."""
        if handle in self._loaded:
            self._housekeeping(("drop", handle))
            self._loaded.discard(handle)
            self._warm.discard(handle)

    def reset(self) -> None:
        """Forget every runner (for the next verify run on this worker); the child keeps its imports."""
        if self._hello is not None:
            self._housekeeping(("reset",))
        self._specs.clear()
        self._loaded.clear()
        self._warm.clear()

    def _housekeeping(self, request: tuple) -> None:
        """A request that runs no file's computation (new inputs, a runner dropped, all dropped): given
        HOUSEKEEPING_LIMIT_S, so that a runtime whose teardown never ends, or a child a file took over, cannot
        hold verify. A child that does not answer is stopped; the next call starts a fresh one, which gets the
        whole state again and loads only the runners it is asked for."""
        try:
            self._call(request, Budget(HOUSEKEEPING_LIMIT_S))
        except Failed as exc:
            if exc.kind not in ("timeout", "crash"):  # a stopped or dead child is replaced by the next call
                raise

    def close(self) -> None:
        """Stop the child. Killed at once: it holds nothing worth a clean exit, and may be mid-import."""
        self._kill()

    # -- the child's life ------------------------------------------------------------------------------

    def _start(self) -> None:
        import edgeq

        root = str(Path(edgeq.__file__).resolve().parents[1])  # the child imports the parent's edgeq
        code = f"import sys; sys.path.insert(0, {root!r}); from edgeq.verify.worker import main; main()"
        cap = "none" if self._memory_limit_gb is None else repr(float(self._memory_limit_gb))
        args = [sys.executable, "-c", code, cap, str(os.getpid())] + ["pte"] * self._programs
        # its own session: no controlling terminal a file could type into (TIOCSTI)
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True)
        self._stderr = OutputTail(self._proc.stderr, tail=STDERR_TAIL)  # nothing passed on: kept for _died
        self._hello = None

    def _ready(self) -> None:
        """Start the child if there is none, wait for its hello, replay the configured state."""
        if self._proc is None:
            self._start()
            self.restarts += 1
        if self._hello is None:
            try:
                kind, value = self._recv(STARTUP_LIMIT_S)
            except (TimeoutError, EOFError, NotData) as exc:
                detail = (self._died() if isinstance(exc, EOFError) else str(exc) if isinstance(exc, NotData)
                          else f"no answer in {STARTUP_LIMIT_S:g} s")
                self._kill()
                from edgeq.errors import EdgeqError

                raise EdgeqError(f"the verify worker process did not start ({detail}); check that "
                                 f"`{sys.executable} -c 'import torch, onnxruntime'` works") from None
            self._hello = value
            if self._state:
                self._call(("configure", self._state), Budget(HOUSEKEEPING_LIMIT_S))

    def _load(self, handle: int, budget: Budget) -> None:
        if handle not in self._loaded:
            self._call(("load", handle, *self._specs[handle]), budget)
            self._loaded.add(handle)

    def _call(self, request: tuple, budget: Budget | None) -> Any:
        """Send one request and wait for its reply for at most the budget left; Failed if there is none."""
        self._ready()
        limit = None if budget is None else budget.seconds
        cap = (self._hello or {}).get("cap_gb")
        if budget is not None and budget.left <= 0:
            raise Failed("timeout", "no time left", limit, cap)
        t0 = time.monotonic()
        try:
            self._send(request)
            kind, value = self._recv(None if budget is None else budget.left)
        except TimeoutError:
            self._kill()
            raise Failed("timeout", "killed", limit, cap) from None
        except (EOFError, BrokenPipeError):
            detail = self._died()
            self._forget()
            raise Failed("crash", detail, limit, cap) from None
        except NotData as exc:  # the child no longer runs edgeq's code: it is not asked anything again
            self._kill()
            raise Failed("crash", str(exc), limit, cap) from None
        finally:
            if budget is not None:
                budget.spent += time.monotonic() - t0
        if kind == "ok":
            return value
        raise Failed(kind, value, limit, cap)

    def _send(self, message: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._proc.stdin.write(_HEADER.pack(len(data)) + data)
        self._proc.stdin.flush()

    def _recv(self, timeout: float | None) -> tuple[str, Any]:
        """One framed reply; TimeoutError when none is complete in time, EOFError when the child is gone."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        buf, need = bytearray(), _HEADER.size
        while len(buf) < need:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            if not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(need - len(buf), 1 << 20))
            if not chunk:
                raise EOFError
            buf += chunk
            if need == _HEADER.size and len(buf) >= need:
                announced = _HEADER.unpack_from(buf)[0]
                need += announced
                if announced > physical_memory_gb() * 2**30:
                    raise NotData(f"the worker announced a reply of {announced} bytes, more than this machine's "
                                  "memory; the worker was stopped (a file may have taken it over)")
        return _reply(bytes(buf[_HEADER.size:need]))

    def _died(self) -> str:
        """How the child ended: its signal or exit code, and the last line it wrote to stderr."""
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        tail = self._stderr.text() if self._stderr is not None else ""
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        return f"{how}: {lines[-1][:200]}" if lines else how

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self._forget()

    def _forget(self) -> None:
        """No child: every runner must be loaded (and warmed) again by the next one."""
        if self._proc is not None:
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        if self._stderr is not None:
            self._stderr.close()
        self._proc, self._stderr, self._hello = None, None, None
        self._loaded.clear()
        self._warm.clear()


# -- the child ---------------------------------------------------------------------------------------


# What a reply may hold besides Python's own containers, numbers and strings: numpy arrays, scalars and dtypes
# (numpy 2 names, then numpy 1's). Replies are read with nothing else, so that a child a file took over cannot
# make this process run code by what it sends back (pickle calls any global it names).
_DATA_GLOBALS = frozenset({("numpy", "dtype"), ("numpy", "ndarray"), ("numpy._core.multiarray", "scalar"),
                           ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
                           ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
                           ("numpy.core.numeric", "_frombuffer")})
_KINDS = frozenset({"ok", "timeout", "memory", "crash", "edgeq", "error"})


class NotData(Exception):
    """A reply that is not what edgeq's child sends: the child was taken over, or its output damaged."""


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DATA_GLOBALS:
            return super().find_class(module, name)
        raise NotData(f"the worker's reply names {module}.{name}, which edgeq's worker never sends; the worker was "
                      "stopped (a file may have taken it over)")


def _reply(payload: bytes) -> tuple[str, Any]:
    """A reply from the child: `(kind, value)`, read with `_DataOnly`; NotData for anything else."""
    import io

    try:
        reply = _DataOnly(io.BytesIO(payload)).load()
    except NotData:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged stream: anything the unpickler raises
        raise NotData(f"the worker's reply could not be read ({type(exc).__name__}); the worker was stopped") from None
    if not (isinstance(reply, tuple) and len(reply) == 2 and reply[0] in _KINDS
            and (reply[0] == "ok" or isinstance(reply[1], str))):
        raise NotData("the worker's reply is not one edgeq's worker sends; the worker was stopped")
    return reply


def main() -> None:
    """The child: replies on a private copy of stdout; whatever a runtime prints goes to stderr."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops us
    from edgeq import limits

    limits.die_with_parent(int(sys.argv[2]))

    # while this process has one thread, before any runtime is imported: what no file may make a runtime do
    gpu = _gpu_devices()
    confinement = limits.confine(files=not gpu, sockets=not gpu, probe=limits.temp_dir())
    import onnx  # noqa: F401  (parsed before each ONNX load: imported now, not on an artifact's time)
    import onnxruntime as ort
    import torch

    if sys.argv[3:] == ["pte"]:
        from edgeq import pte

        pte.available(runtime_only=True)  # imported before the cap: the runtime, not a file, takes that memory
    cuda = torch.cuda.is_available()
    # what the imports made lives as long as this process: frozen out of the collector's sight, the
    # collection after each dropped runner (_release) walks only what the runners made (it walked torch's
    # and onnxruntime's objects too: 71 ms each, 188 of them in a verify of the MNIST export)
    gc.freeze()
    cap_gb = None if cuda or sys.argv[1] == "none" else limits.cap_memory(float(sys.argv[1]))
    send = _sender(reply_fd)
    send(("ok", {"cuda": cuda, "cuda_name": torch.cuda.get_device_name(0) if cuda else None,
                 "providers": ort.get_available_providers(), "cap_gb": cap_gb,
                 "confinement": confinement}))
    child = _Child()
    while (request := _receive(0)) is not None:
        try:
            reply: tuple[str, Any] = ("ok", getattr(child, request[0])(*request[1:]))
        except Exception as exc:
            reply = _failure(exc)
        send(reply)


class _Child:
    """The child's runners and inputs; each public method is one request the parent may send."""

    def __init__(self) -> None:
        self.runners: dict[int, Any] = {}
        self.state: dict[str, Any] = {"threads": 1, "batches": {}, "inputs": {}}

    def configure(self, new: dict) -> None:
        import torch

        self.state.update(new)
        torch.set_num_threads(self.state["threads"])  # this process is verify's own: nothing to restore

    def load(self, handle: int, path: str, fmt: str, device: str, threads: int, options: dict | None) -> None:
        import torch

        from edgeq import runtime
        from edgeq.errors import EdgeqError
        from edgeq.verify.integrity import external_data

        if fmt == "onnx":  # parsed here, under the memory cap, never in verify's own process
            problems = external_data(Path(path), Path(path).name)
            if problems:
                raise EdgeqError(problems[0])
        self.runners[handle] = runtime.load(Path(path), fmt, device, threads=threads, options=options)
        torch.set_num_threads(self.state["threads"])  # loading a torch runner sets its own

    def warm(self, handle: int, calls: int, batch: str | None = None) -> None:
        from edgeq import timing
        from edgeq.errors import EdgeqError

        if batch is not None and batch not in self.state["batches"]:
            raise EdgeqError(f"no batch named {batch!r} is configured")
        for name, xb in self.state["batches"].items():
            if batch is None or name == batch:
                timing.warm_up([self.runners[handle].run], xb, calls)

    def window(self, handle: int, batch: str, window_s: float) -> list[float]:
        from edgeq import timing

        return timing.timed_round([self.runners[handle].run], self.state["batches"][batch], window_s)[0]

    def tensor(self, root: str, item: dict, what: str, max_bytes: int):
        """A golden file, parsed here, under the memory cap."""
        from edgeq import golden

        return golden.read_listed(Path(root), item, what, max_bytes)

    def predict(self, handle: int, batch: int, on: str):
        from edgeq import runtime

        x = self.state["x"] if on == "x" else self.state["inputs"][on]
        return self.runners[handle].predict(x, batch or runtime.PREDICT_BATCH)

    def drop(self, handle: int) -> None:
        """Unload a runner and hand the freed memory back: the cap then holds one runner's, not all of them."""
        self.runners.pop(handle, None)
        _release()

    def reset(self) -> None:
        self.runners.clear()


def _failure(exc: Exception) -> tuple[str, str]:
    """The reply for a request that raised: memory when the runtime says so, an EdgeqError's own message,
    else a runtime's first line (the parent names the file and the step)."""
    from edgeq.errors import EdgeqError, first_line

    if isinstance(exc, MemoryError):
        return "memory", "MemoryError"
    found = _ALLOCATION.search(str(exc))
    if found:  # the runtimes say so deep inside long messages
        return "memory", str(exc)[found.start():].splitlines()[0][:160]
    return ("edgeq", str(exc)) if isinstance(exc, EdgeqError) else ("error", first_line(exc))


def _sender(fd: int):
    def send(message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(fd, view):]

    return send


def _receive(fd: int) -> Any:
    """The next request, or None at end of input (the parent closed the pipe or died)."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exactly(fd, _HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _release() -> None:
    """Collect garbage, then return the C heap's free pages to the OS (glibc's malloc_trim): a runner's
    buffers, once dropped, no longer count against the address-space cap."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


GPU_DEVICES = ("nvidia", "nvhost", "nvmap", "kfd", "dxg")  # NVIDIA, Jetson, ROCm, WSL2


def _gpu_devices() -> bool:
    """A GPU device node here: its driver opens device files read-write, calls their ioctls, writes caches and
    may reach a daemon over a unix socket (CUDA MPS), none of which the rules model (no GPU machine to test
    them on), so the worker's files and sockets are left unconfined there; the TCP and signal rules stay."""
    names = os.listdir("/dev") if os.path.isdir("/dev") else ()
    return any(name.startswith(GPU_DEVICES) for name in names)


if __name__ == "__main__":  # pragma: no cover
    main()
