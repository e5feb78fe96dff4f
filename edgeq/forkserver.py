"""A fork server of edgeq's own, which local pool workers (edgeq.trials.Pool) are forked from.

A pool worker started with `spawn` imports its runtimes itself: torch, onnx and, for the `.pte` stage, what
lowering imports (ExecuTorch, XNNPACK's partitioner, torchao): about 6 s of a 2-core machine per worker and per
pool, beside the export. The server is a process started once per calling process (the first pool), with one
thread, that imports them once (edgeq.worker_imports) and then forks each worker; a forked worker starts with
them imported and shares their pages with the server. A pool whose workers lower no program asks for a
server of its own that imports only numpy and onnx (`ONNX`): its trials do not import torch.

It is multiprocessing's fork server program (`multiprocessing.forkserver.main`) run as a second, private
instance: not the process-wide `forkserver` start method, whose server (one per process, with its preloads)
any other library of the calling process may use and configure. Workers reach it through `context()`, a
multiprocessing context whose processes are forked by this server. Where the platform has no fork server
(`multiprocessing.get_all_start_methods()`), pools spawn their workers and this module is not imported.

What differs from `spawn`:
- a worker forked from the server has the server's environment variables; the pool hands it the calling
  process's (`edgeq.trials._worker_start`);
- the calling process's main script is never run again in a worker: its path is left out of what the
  worker is given (with `spawn` it is hidden while processes start: `edgeq.trials._main_not_rerun`);
- the first worker waits for the server's imports (the server forks once they are done); a pool started
  ahead (`edgeq.trials.Pool.start`) waits for them on a thread of its own;
- a server that has exited (killed, or a crash in an import) is replaced by the next worker's start; a worker
  that cannot be forked by a server still running, or by its replacement, raises `WorkerStartError`. A pool
  learns that its workers ended from their server: when the server exits, the pool takes its workers for dead
  and stops them, and edgeq.trials runs their trials again on fresh workers (tests/test_trials.py);
- a worker has the server's standard streams, CPU affinity and resource limits, as they were when the server
  started (the first pool of the process), and the modules the server imported, as they were then: where the
  calling process changes those later (an edited edgeq in a notebook, a `sys.path` entry added at run time that
  finds another edgeq: the server imports from the interpreter's own path, in the calling process's working
  directory and environment at its start), the workers do not see the change.
"""

from __future__ import annotations

import io
import os
import threading
import time
from multiprocessing import context as mp_context
from multiprocessing import forkserver, popen_forkserver, spawn, util

from edgeq.errors import TrialError

# What a server imports once, for every worker it forks: for pools whose workers lower programs (torch, onnx and
# ExecuTorch's lowering), and for the others (their trials import onnxruntime's quantization tool, not torch)
LOWERING = ("edgeq.worker_imports",)
ONNX = ("edgeq.trials", "numpy", "onnx")
_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")  # how `spawn` finds the caller's main script again

_lock = threading.Lock()
_servers: dict[tuple[str, ...], forkserver.ForkServer] = {}


class WorkerStartError(TrialError):
    """A pool worker could not be forked: its server did not answer, and was not replaced by a new one."""


def server(preload: tuple[str, ...] = LOWERING) -> forkserver.ForkServer:
    """This process's server for `preload`, started on first use (its imports run in the background); started
    again when it has exited."""
    with _lock:
        srv = _servers.get(preload)
        if srv is None:
            srv = _servers[preload] = forkserver.ForkServer()
            srv.set_forkserver_preload(list(preload))
    srv.ensure_running()
    return srv


def server_pid(preload: tuple[str, ...] = LOWERING) -> int | None:
    """The running server's process id, None before the first pool of this process that asked for it."""
    srv = _servers.get(preload)
    return None if srv is None else srv._forkserver_pid  # noqa: SLF001


class _Popen(popen_forkserver.Popen):
    """`multiprocessing.popen_forkserver.Popen` asking this module's server, with the caller's main script left
    out of the worker's preparation data."""

    def _launch(self, process_obj) -> None:
        prep = spawn.get_preparation_data(process_obj._name)
        for key in _MAIN_KEYS:
            prep.pop(key, None)
        buf = io.BytesIO()
        mp_context.set_spawning_popen(self)
        try:
            mp_context.reduction.dump(prep, buf)
            mp_context.reduction.dump(process_obj, buf)
        finally:
            mp_context.set_spawning_popen(None)
        preload = process_obj.preload
        for attempt in range(2):
            srv = server(preload)
            pid = srv._forkserver_pid  # noqa: SLF001
            try:
                self.sentinel, w = srv.connect_to_new_process(self._fds)
                parent_w = os.dup(w)  # the child's sentinel of its parent, as popen_forkserver keeps it
                self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
                with open(w, "wb", closefd=True) as f:
                    f.write(buf.getbuffer())
                self.pid = forkserver.read_signed(self.sentinel)
                return
            except (EOFError, OSError) as exc:
                if getattr(self, "finalizer", None) is not None:
                    self.finalizer()  # this attempt's pipes closed
                    self.finalizer = None
                if attempt or not _forget_if_dead(srv, pid):
                    raise WorkerStartError(f"edgeq's fork server (pid {pid}) did not fork a pool worker ({exc}); "
                                           "run with jobs=1 to see why") from None


def _forget_if_dead(srv: forkserver.ForkServer, pid: int | None, wait_s: float = 2.0) -> bool:
    """After a failed fork: True when the server `pid` has exited (reaped here, within `wait_s`, and forgotten, so
    that the next `ensure_running` starts another) or was replaced already; False when it is still running (it is
    left alone: its other workers depend on it)."""
    deadline = time.monotonic() + wait_s
    with srv._lock:  # noqa: SLF001 - ensure_running's, so that no other thread reaps or replaces it meanwhile
        if pid is None or srv._forkserver_pid != pid:  # noqa: SLF001
            return True
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                break
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        os.close(srv._forkserver_alive_fd)  # noqa: SLF001 - as ensure_running forgets a dead server
        srv._forkserver_address = srv._forkserver_alive_fd = srv._forkserver_pid = None  # noqa: SLF001
        return True


class _Process(mp_context.ForkServerProcess):
    preload: tuple[str, ...] = LOWERING  # which server forks it

    @staticmethod
    def _Popen(process_obj):  # noqa: N802 - multiprocessing's name
        return _Popen(process_obj)


class _Context(mp_context.ForkServerContext):
    def __init__(self, preload: tuple[str, ...]) -> None:
        self.preload = preload

    def Process(self, *args, **kwargs) -> _Process:  # noqa: N802 - multiprocessing's name
        process = _Process(*args, **kwargs)
        process.preload = self.preload
        return process


def context(preload: tuple[str, ...] = LOWERING) -> mp_context.BaseContext:
    """A multiprocessing context whose processes this module's server for `preload` forks (for
    ProcessPoolExecutor's `mp_context`); its queues and locks are the fork server method's."""
    return _Context(preload)
