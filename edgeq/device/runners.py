"""Each artifact format in its runtime on the device: edgeq.runtime's loaders, with the device's settings
(its thread count, an optional graph optimization level), and a one-line reason when a file cannot run.
ONNX needs onnxruntime only; TorchScript files run where torch imports, ExecuTorch programs where
ExecuTorch's runtime does; checkpoints need the model's code and are never run here.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq import runtime, timing
from edgeq.errors import IntegrityError, first_line

Run = Callable[[np.ndarray], np.ndarray]
OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
ZIP = b"PK\x03\x04"  # a checkpoint and a TorchScript file are zip archives (torch.save, torch.jit.save)


class CannotRun(Exception):
    """A file its runtime refused: the message is the row's one line."""


def session_options(threads: int, options: dict | None, optimization: str | None) -> dict:
    """The manifest's session options for timing at `threads` (edgeq.timing: idle workers do not spin),
    with `optimization` overriding its graph optimization level (to measure tolerances)."""
    merged = dict(options or {})
    merged["config_entries"] = {**(timing.ort_timing_options(threads) or {}).get("config_entries", {}),
                                **merged.get("config_entries", {})}
    if optimization:
        merged["graph_optimization_level"] = OPTIMIZATION_LEVELS[optimization]
    return merged


def load_onnx(path: Path, threads: int, options: dict | None, optimization: str | None = None,
              time_limit_s: float | None = None) -> Run:
    """x -> logits for an ONNX file (edgeq.runtime's session), or CannotRun with onnxruntime's first line.
    A call that outlives `time_limit_s` is stopped by onnxruntime (RunOptions.terminate, set by `_Watch`) and
    raises TimeLimit."""
    import onnxruntime as ort

    if why := runtime.session_options_problem(options):
        raise CannotRun(f"{why}: the manifest's onnxruntime settings are refused")
    try:
        sess = runtime.ort_session(path, threads, session_options(threads, options, optimization))
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise CannotRun(f"onnxruntime cannot load it ({first_line(exc)})") from None
    name = sess.get_inputs()[0].name
    if time_limit_s is None:
        return lambda x: sess.run(None, {name: x})[0]
    options = ort.RunOptions()
    options.log_severity_level = 4  # a stopped call is the row's one line, not onnxruntime's error log too
    call = _Call(lambda: setattr(options, "terminate", True), time_limit_s)
    _WATCH.add(call)

    def run(x: np.ndarray) -> np.ndarray:
        call.started = time.monotonic()  # two assignments a call: nothing a timing window would see
        try:
            return sess.run(None, {name: x}, options)[0]
        except Exception:
            if options.terminate:
                options.terminate = False
                raise TimeLimit(f"did not finish within {time_limit_s:g} s (--time-limit); a file that runs "
                                "forever is stopped, not waited for") from None
            raise
        finally:
            call.started = None

    return run


class TimeLimit(Exception):
    """A call its time limit stopped."""


@dataclass(eq=False)
class _Call:
    stop: Callable[[], None]  # stops the call under way: onnxruntime's terminate flag
    limit_s: float
    started: float | None = None  # time.monotonic() of the call under way, or None


def _limited(run: Run, file: str, time_limit_s: float | None) -> Run:
    """`run`, each call marked on the confined child's watch page (edgeq.limits.Watch), where the checker's own
    process stops the child if it outlives `time_limit_s`: for runtimes that cannot stop a call themselves
    (TorchScript, ExecuTorch). Outside such a child, calls have no limit."""
    from edgeq import limits

    if time_limit_s is None or not limits.WATCH:
        return run
    watch, name = limits.WATCH[0], limits.WATCH[0].name(file)

    def limited(x: np.ndarray) -> np.ndarray:
        watch.begin(name, time_limit_s, 1)
        try:
            return run(x)
        finally:
            watch.end()

    return limited


@contextlib.contextmanager
def _loading(file: str, time_limit_s: float | None):
    """The load itself under the limit (a file can make its runtime's loader run for ever too)."""
    from edgeq import limits

    if time_limit_s is None or not limits.WATCH:
        yield
        return
    watch = limits.WATCH[0]
    watch.begin(watch.name(file), time_limit_s, 0)
    try:
        yield
    finally:
        watch.end()


class _Watch:
    """One daemon thread for the process: every POLL_S it stops each call that has run past its limit."""

    POLL_S = 0.25

    def __init__(self) -> None:
        self.calls: weakref.WeakSet = weakref.WeakSet()
        self.thread: threading.Thread | None = None

    def add(self, call: _Call) -> None:
        self.calls.add(call)
        if self.thread is None or not self.thread.is_alive():  # a forked child has none of its parent's threads
            self.thread = threading.Thread(target=self._loop, name="edgeq-time-limit", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.POLL_S)
            now = time.monotonic()
            for call in list(self.calls):
                started = call.started
                if started is not None and now - started > call.limit_s:
                    call.stop()


_WATCH = _Watch()


def load_torchscript(path: Path, threads: int, engine: str | None, time_limit_s: float | None = None) -> Run:
    """A TorchScript file (edgeq.runtime); an int8 one in the quantized engine its manifest entry names. Its
    load and calls are limited in the checker's confined child (`_limited`)."""
    try:
        with _loading(path.name, time_limit_s):
            run = runtime.load_torchscript(path, "cpu", threads, {"quantized_engine": engine} if engine else None).run
        return _limited(run, path.name, time_limit_s)
    except IntegrityError as exc:
        raise CannotRun(f"torch cannot load it ({str(exc).removeprefix(f'{path.name}: ')})") from None
    except Exception as exc:
        raise CannotRun(f"torch cannot load it ({first_line(exc)})") from None


def load_pte(path: Path, threads: int, time_limit_s: float | None = None) -> Run:
    """x -> logits for an ExecuTorch program (edgeq.runtime.load_pte: a batch other than the program's fixed
    one runs as calls of it), or CannotRun in one line. Its load and calls are limited in the checker's
    confined child (`_limited`)."""
    try:
        with _loading(path.name, time_limit_s):
            run = runtime.load_pte(path, threads).run
        return _limited(run, path.name, time_limit_s)
    except IntegrityError as exc:
        raise CannotRun(str(exc).removeprefix(f"{path.name}: ")) from None
    except Exception as exc:  # ExecuTorch raises its own untyped errors
        raise CannotRun(f"ExecuTorch cannot load it ({first_line(exc)})") from None


def executorch_missing() -> str | None:
    """None where ExecuTorch's runtime (XNNPACK linked in) imports here; else why not, in one line with
    the install command. Only the runtime bindings are imported, never the exporter."""
    try:
        from edgeq import pte
    except ImportError as exc:  # a partial copy of the edgeq package, or no torch
        return f"ExecuTorch's runtime cannot be imported ({first_line(exc)}): pip install 'edgeq[executorch]'"
    return pte.available(runtime_only=True)


def torch_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def not_its_format(path: Path, fmt: str) -> str | None:
    """Why a file that is not run here cannot be of its stated format, from its first bytes (a relabelled
    file), or None: checkpoints and TorchScript files are zip archives."""
    if fmt not in runtime.FORMATS:
        return f"format {fmt!r} is not one edgeq writes ({', '.join(runtime.FORMATS)}); copy manifest.json again"
    if fmt in ("checkpoint", "torchscript"):
        with open(path, "rb") as f:
            if f.read(4) != ZIP:
                return f"not a {fmt} file (not a zip archive, as torch writes them); copy it again from the export"
    return None
