"""Run independent untimed trials in-process, in a process pool on every core, or on a Ray cluster.

A trial is a pure, module-level function `fn(shared, item) -> value`: values in, values out.
`shared` is a mapping of large read-only values (numpy arrays, file bytes) that every trial of a run
reads; it reaches each worker once (a pool worker's initializer, one `ray.put` for Ray). `item` is
one trial's small settings. Files travel as bytes, never as paths, so that a trial can run on
another machine; `shared_file(data)` turns bytes back into a path, once per process, for tools
that want one.

    trials = run(qdq_accuracy, configs, {"fp32": onnx_bytes, "calibration": batches, ...}, Workers(jobs=2))
    values = [t.value for t in trials]                 # in the order of `configs`, whatever ran where

`run` returns one `Trial` per item, in the order of the items: a plan built from the values is the
same whatever the number of workers, the backend, or the order trials finished in. A worker that
dies (a crash in native code, a kill, the out-of-memory killer) has its trial run again, up to
`Workers.retries` times. The backend follows `Workers`:
- `jobs=1`: in this process, one trial after the other; no pool, no pickling;
- otherwise a pool of `jobs` processes (default: every core this process may use), one intra-op thread
  each, forked from edgeq's own fork server (edgeq.forkserver), which imported their runtimes once; never
  from this process (`fork`: torch and onnxruntime hold threads). `spawn` where the platform has no fork
  server;
- `ray_address` given: tasks on a Ray cluster (`"local"` starts one on this machine). Nothing about
  Ray is imported otherwise.

Timing: `run` is for untimed trials only. Trials share cores, caches and memory bandwidth with each
other, so a latency measured inside one is noise. Timed trials stay serial on the driver, or run
on Ray nodes that do nothing else (`Workers(resources={"target:arm64": 1}, cpus=0)` against nodes
started with `--num-cpus=0 --resources '{"target:arm64": 1}'`: one trial at a time per node).
docs/scale.md has the figures and how to start a cluster.

`Pool.beside(fn, item)` runs one job on a local worker while the caller works on (a program lowered
while the next one is screened) and returns its future; edgeq.timing waits for such jobs before a
timed round.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edgeq.errors import ConfigError, TrialError, first_line

TrialFn = Callable[[Mapping[str, Any], Any], Any]

DEFAULT_RETRIES = 2  # runs of a trial beyond its first after its worker died
THREADS_PER_WORKER = 1  # intra-op threads of torch/onnxruntime/BLAS in a pool worker: the cores are the workers
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS")
RAY_EXTRA = "pip install 'edgeq[ray]'"
RAY_DEFAULT_PORT = 6379
CONNECT_TIMEOUT_S = 5.0  # a TCP connection to the Ray head; ray.init itself waits minutes on a dead address
LOG_EVERY_S = 30.0  # off a terminal, a progress line at most this often


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Workers:
    """Where a run's trials go.

    jobs: worker processes on this machine (None: every core; 1: in this process, serially). With Ray:
      the most trials in flight at once (None: all of them; the cluster's CPUs decide).
    ray_address: a Ray cluster's address ("HOST:PORT", "ray://HOST:PORT", "auto"), or "local" to start
      one on this machine; None: no Ray. `Workers.from_env` falls back to RAY_ADDRESS.
    resources: Ray custom resources each trial needs, e.g. {"target:arm64": 1} (nodes labelled with
      `ray start --resources`); Ray only.
    cpus: CPUs each Ray task holds (1; 0 for a labelled node started with --num-cpus=0).
    retries: runs of a trial beyond its first when the worker (or Ray node) running it died.
    """

    jobs: int | None = None
    ray_address: str | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    cpus: float = 1.0
    retries: int = DEFAULT_RETRIES

    def __post_init__(self) -> None:
        if self.jobs is not None and (isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1):
            raise ConfigError(f"jobs={self.jobs!r}: the number of workers is a whole number >= 1 "
                              "(1: in this process; leave it unset for every core)")
        if self.ray_address is not None and not (isinstance(self.ray_address, str) and self.ray_address.strip()):
            raise ConfigError(f"--ray {self.ray_address!r}: a Ray address is HOST:PORT, ray://HOST:PORT, auto or local")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries={self.retries!r}: a whole number >= 0")
        if not self.cpus >= 0:
            raise ConfigError(f"cpus={self.cpus!r}: CPUs per Ray task is a number >= 0")
        bad = [k for k, v in dict(self.resources).items() if not (isinstance(k, str) and k and v > 0)]
        if bad:
            raise ConfigError(f"resources {bad[0]!r}: a custom resource is a name and an amount > 0, "
                              "e.g. {'target:arm64': 1}")
        if self.ray_address is None and (self.resources or self.cpus != 1.0):
            raise ConfigError("resources and cpus place trials on Ray nodes: give a Ray address too "
                              "(--ray ADDRESS, recipe.ray_address or RAY_ADDRESS)")
        object.__setattr__(self, "resources", MappingProxyType(dict(self.resources)))

    def __hash__(self) -> int:
        return hash((self.jobs, self.ray_address, tuple(sorted(self.resources.items())), self.cpus, self.retries))

    @classmethod
    def from_env(cls, jobs: int | None = None, ray_address: str | None = None, **kwargs: Any) -> Workers:
        """Workers for `--ray ADDRESS` / `recipe.ray_address`, falling back to the RAY_ADDRESS variable."""
        return cls(jobs=jobs, ray_address=ray_address or os.environ.get("RAY_ADDRESS") or None, **kwargs)

    @property
    def backend(self) -> str:
        """"ray", "pool" or "serial"."""
        return "ray" if self.ray_address else "serial" if self.jobs == 1 else "pool"


@dataclass(frozen=True)
class Trial:
    """One trial's value and where it ran: `node` is the Ray node id ("" off Ray), for a plan's evidence.
    Only `index` and `value` are the same from one run to the next."""

    index: int
    value: Any
    host: str
    pid: int
    node: str = ""


@dataclass(frozen=True)
class Progress:
    """A run's state, given to a `progress` callback after every start and finish."""

    what: str
    done: int
    total: int
    busy: int
    workers: int


ProgressFn = Callable[[Progress], None]


def run(fn: TrialFn, items: Sequence[Any], shared: Mapping[str, Any] | None = None, workers: Workers = Workers(),
        *, progress: bool | ProgressFn = True, what: str = "trials", budget_s: float = math.inf) -> list[Trial | None]:
    """Every `fn(shared, item)`, on `workers` -> one `Trial` per item, in the order of `items`.

    `shared` reaches each worker once, read-only. A trial that raises stops the run: its exception is
    raised here, noted with the trial it came from. A trial whose worker (or Ray node) died is run
    again, up to `workers.retries` times; then TrialError names it. progress: True shows trials done / total and
    workers busy (a bar on a terminal, a line every 30 s and one at the end elsewhere), False nothing, a
    function receives a `Progress` after every change. For untimed trials only (the module says why).
    budget_s: a trial is not started when, by the mean time of the trials finished so far, it would end
    past `budget_s` seconds from the call (the first ones, one per worker, always start unless the budget
    is 0); its place in the list is None, and so is every later trial's.
    The workers start and stop with the call; `Pool` keeps them for several runs.
    """
    items = list(items)
    with Pool(workers, _most=len(items)) as pool:
        return pool.run(fn, items, shared, progress=progress, what=what, budget_s=budget_s)


class Pool:
    """Workers kept for several runs, so that each process starts and imports its runtimes once
    (onnxruntime's quantization tool: 2-5 s) instead of once per run. Close it, or use `with`:

        with Pool(Workers(jobs=2)) as pool:
            calibration = pool.run(qdq_accuracy, candidates, shared)
            sensitivity = pool.run(layer_trial, layers, shared)

    `warm`: a function the workers call before the jobs that need its imports (`warm_up`).

    Each run's `shared` reaches each worker once (a local worker reads it from a private file the
    first time it runs a trial of that run; Ray puts it in the object store once). A Ray connection
    opened here stays open until the process ends: a new `--ray local` cluster takes 7-9 s to start.
    """

    def __init__(self, workers: Workers = Workers(), *, warm: Callable[[], object] | None = None,
                 _most: int | None = None) -> None:
        self.workers = workers
        self._warm, self._warmed = warm, False  # imports the workers' later jobs need (`warm_up`)
        self.size = workers.jobs or available_cores()
        if _most:  # a one-shot run needs no more processes than it has trials
            self.size = max(1, min(self.size, _most))
        self._executor = None
        self._ready = None  # released once by each worker process at the end of its start (`_worker_start`)
        self._forked = False  # its workers are forked from edgeq's fork server (edgeq.forkserver), not spawned
        self._folder: Path | None = None
        self._runs = 0

    def run(self, fn: TrialFn, items: Sequence[Any], shared: Mapping[str, Any] | None = None, *,
            progress: bool | ProgressFn = True, what: str = "trials", budget_s: float = math.inf) -> list[Trial | None]:
        """As `run` (the module function), on this pool's workers."""
        items = list(items)
        shared = MappingProxyType(dict(shared or {}))
        if not items:
            return []
        match self.workers.backend:
            case "serial":
                with _Display(progress, what, len(items), 1) as display:
                    return _serial(fn, items, shared, display, Clock(budget_s))
            case "pool":
                _check_picklable(fn)
                with _Display(progress, what, len(items), min(self.size, len(items))) as display:
                    return self._local(fn, items, shared, display, Clock(budget_s))
            case "ray":
                ray = _connect(self.workers)
                _check_resources(ray, self.workers)
                slots = int(ray.cluster_resources().get("CPU", 0) // self.workers.cpus) if self.workers.cpus else 0
                busy = min(self.workers.jobs or len(items), slots or len(items), len(items))
                # with a budget, no more in flight than the cluster runs at once: a queued trial cannot be unstarted
                limit = busy if math.isfinite(budget_s) else (self.workers.jobs or len(items))
                with _Display(progress, what, len(items), busy) as display:
                    return _ray(ray, fn, items, shared, self.workers, display, Clock(budget_s), limit)
        raise AssertionError(self.workers.backend)  # pragma: no cover

    def start(self) -> Pool:
        """Start the local worker processes now rather than at the first run, so that they import their
        runtimes while this process works on (building the fp32 file, say). Their start is work beside this
        process: edgeq.timing waits for it to end before a timed round."""
        if self.workers.backend == "pool" and self._executor is None:
            executor = self._start()

            def submit() -> None:
                for _ in range(self.size):
                    executor.submit(os.getpid)

            if self._forked:  # a forked worker waits for the server's imports: not this process
                started = _started(self._ready, self.size, executor, submit)
            else:
                with _main_not_rerun():
                    submit()
                started = _started(self._ready, self.size, executor)
            from edgeq import timing

            timing.beside(started)
        return self

    def beside(self, fn: TrialFn, item: Any):
        """One untimed job, `fn({}, item)`, on a worker of this pool while this process works on -> its
        concurrent.futures.Future; None without local workers (one job, or Ray): the caller runs it itself.
        edgeq.timing waits for it before a timed round (nothing runs beside one). A worker that dies
        fails the future with BrokenProcessPool: call `restart` before running it again."""
        if self.workers.backend != "pool":
            return None
        _check_picklable(fn)
        with _main_not_rerun():
            future = self._start().submit(fn, {}, item)
        from edgeq import timing

        timing.beside(future)
        return future

    def warm_up(self) -> None:
        """The pool's `warm()` (imports its workers' later jobs need) sent as one job per worker, beside this
        process: called where a stretch of untimed work starts, so that the first of those jobs does not wait
        for the imports, and no timed round starts before they are done (`beside`). Idle workers take one each;
        a busy one may leave its job to another, which then imports twice (nothing). Nothing without local
        workers or `warm`, or once done; a pool whose worker died is started afresh first."""
        if self.workers.backend != "pool" or self._warm is None or self._warmed:
            return
        self._fresh()
        self._warmed = True
        for _ in range(self.size):
            self.beside(_warm_call, self._warm)

    def _fresh(self) -> None:
        """A pool whose worker died with no job of this process left to see it (a warm-up, a job sent beside
        and never taken) is restarted, so that the next job or run starts fresh processes."""
        if self._executor is not None and getattr(self._executor, "_broken", False):
            self.restart()

    def restart(self) -> None:
        """After a worker died under `beside`: the next job or run starts fresh processes."""
        self._warmed = False
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def close(self) -> None:
        """Stop the local worker processes (they finish the trial they run) and remove the run files."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self._executor is None:
            self._forked = "forkserver" in multiprocessing.get_all_start_methods()
            if self._forked:
                from edgeq import forkserver

                context = forkserver.context(forkserver.ONNX if self._warm is None else forkserver.LOWERING)
            else:  # pragma: no cover - platforms without fd passing
                context = multiprocessing.get_context("spawn")
            self._ready = context.Semaphore(0)
            self._executor = ProcessPoolExecutor(self.size, mp_context=context, initializer=_worker_start,
                                                 initargs=(THREADS_PER_WORKER, self._ready, dict(os.environ)))
        return self._executor

    def _local(self, fn: TrialFn, items: list, shared: Mapping[str, Any], display: _Display,
               clock: Clock) -> list[Trial | None]:
        """Trials on the pool's processes. When a worker dies every trial in flight fails with it; those
        run again, each alone, so that a second death is charged to the trial that caused it."""
        from concurrent.futures import FIRST_COMPLETED, Future, wait
        from concurrent.futures.process import BrokenProcessPool

        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="edgeq-pool-"))  # 0700: only this user's workers read it
            weakref.finalize(self, shutil.rmtree, self._folder, True)  # a pool never closed
        self._fresh()
        self._runs += 1
        values = self._folder / f"run-{self._runs}.pickle"
        values.write_bytes(pickle.dumps(dict(shared), protocol=pickle.HIGHEST_PROTOCOL))
        host, results, n = socket.gethostname(), [None] * len(items), min(self.size, len(items))
        pending, suspects, deaths, done = deque(range(len(items))), set(), [0] * len(items), 0
        running: dict[Future, int] = {}
        try:
            while pending or running:
                executor = self._start()
                with _main_not_rerun():  # a new worker process may start on a submit
                    while pending and len(running) < n and not (pending[0] in suspects and running):
                        if not (pending[0] in clock.started or clock.may_start()):
                            pending.clear()  # past the budget: this trial and every later one stay None
                            break
                        i = pending.popleft()
                        clock.start(i)
                        running[executor.submit(_pool_call, fn, str(values), items[i])] = i
                        if i in suspects:
                            break  # a suspect runs alone
                display(done, len(running))
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                if any(isinstance(f.exception(), BrokenProcessPool) for f in finished):
                    finished, _ = wait(running)  # a broken pool fails every future it holds: collect them all
                lost = []
                for future in finished:
                    i = running.pop(future)
                    exc = future.exception()
                    if exc is None:
                        value, pid = future.result()
                        results[i], done = Trial(i, value, host, pid), done + 1
                        clock.finish(i)
                    elif isinstance(exc, BrokenProcessPool):
                        lost.append(i)
                    else:
                        raise _noted(exc, i, items)
                if lost:
                    self._lost(lost, items, deaths)
                    suspects.update(lost)
                    pending.extendleft(sorted(lost, reverse=True))
            display(done, 0)
            return results
        except BaseException:
            for future in running:
                future.cancel()
            raise
        finally:
            values.unlink(missing_ok=True)


    def _lost(self, lost: list[int], items: list, deaths: list[int]) -> None:
        """Trials whose worker died: the pool starts fresh processes; a trial that died alone (or was the
        only one in flight) is charged with the death, and past `retries` deaths it is named."""
        self._executor.shutdown(wait=True)
        self._executor, self._warmed = None, False  # the next round starts fresh processes
        if len(lost) == 1:
            i = lost[0]
            deaths[i] += 1
            if deaths[i] > self.workers.retries:
                raise TrialError(f"{_name(i, items)}: the worker process running it died {deaths[i]} times (a "
                                 "crash in native code, a kill or out of memory); run it with jobs=1 to see the "
                                 "crash") from None


WORKER_START_S = 120.0  # the longest a timed round waits for a pool's workers to start (one that never does)


def _worker_start(threads: int, ready, environ: dict[str, str]) -> None:
    """A pool worker's initializer: the environment variables of the process that started the pool (a worker forked
    from edgeq's fork server has the server's) and the temporary folder they name, its thread counts
    (`set_process_threads`), then `ready` released: its start, imports included, is over."""
    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)
        tempfile.tempdir = None  # found again from TMPDIR: the server's imports may have looked it up
    set_process_threads(threads)
    _exit_with_starter()
    ready.release()


def _exit_with_starter() -> None:
    """A pool worker ends when the process that started it is gone (killed: it closes nothing). Otherwise the
    worker would wait on its queue for ever, which the other workers hold open, and a forked one would keep its
    server alive too. multiprocessing's parent sentinel, the caller's end of the pipe that brought the worker its
    start, is readable once that process has exited."""
    import multiprocessing
    import threading

    starter = multiprocessing.parent_process()
    if starter is None or starter.sentinel is None:
        return

    def watch() -> None:
        from multiprocessing.connection import wait

        wait([starter.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="edgeq-starter-watch", daemon=True).start()


def _warm_call(shared, warm) -> None:
    """A `Pool.warm_up` job: the pool's `warm()`; one that fails is left to the job that needs it to report."""
    try:
        warm()
    except Exception:  # noqa: BLE001 - raised again where the job that needs it is reported
        pass


def _started(ready, workers: int, executor, submit: Callable[[], object] | None = None):
    """A future done once `workers` processes of `executor` have released `ready` (`_worker_start`), or once the
    executor is broken (a worker died starting: the pool's next job says so), or after WORKER_START_S. `submit`,
    where given, starts the processes, on a thread of its own (a start that never returns ends the wait no later);
    where it fails, the future is done at once, and the pool's next job starts them again and reports what fails."""
    import threading
    from concurrent.futures import Future

    future: Future = Future()
    failed = threading.Event()

    def starting() -> None:
        try:
            submit()
        except Exception:  # noqa: BLE001 - reported by the pool's next job, which meets it again
            failed.set()

    def wait() -> None:
        deadline, released = time.monotonic() + WORKER_START_S, 0
        if submit is not None:
            threading.Thread(target=starting, name="edgeq-pool-fork", daemon=True).start()
        try:
            while (released < workers and time.monotonic() < deadline and not failed.is_set()
                   and not getattr(executor, "_broken", False)):
                released += ready.acquire(timeout=0.25)
        finally:
            future.set_result(None)

    threading.Thread(target=wait, name="edgeq-pool-start", daemon=True).start()
    return future


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """While worker processes start: the caller's main script is not run again in them.

    A spawned process re-runs the parent's `__main__` file (as `__mp_main__`) to find what it may need:
    a user's script that calls `edgeq.compress` at its top level, without an `if __name__ == "__main__"`
    guard, would export again in every worker. Trials are module-level functions of edgeq, so the
    workers need nothing from it: its file and spec are hidden from multiprocessing while processes
    start, and put back after."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            if "__spec__" in saved:
                main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


# ---------------------------------------------------------------------------------------------------
# Files as bytes


_FILES: dict[str, Path] = {}
_FILES_BY_ID: dict[int, tuple[bytes, Path]] = {}
_SCRATCH: list[Path] = []
_SCRATCH_PREFIX = "edgeq-trial-"


def shared_file(data: bytes, suffix: str = "") -> Path:
    """`data` as a file in this process's scratch dir -> its path, for tools that want a path. Written
    once per process and content (sha256), so every trial of a worker reuses it."""
    hit = _FILES_BY_ID.get(id(data))
    if hit is not None and hit[0] is data and hit[1].exists():
        return hit[1]  # the same bytes object again (a worker's `shared`): no hashing
    key = hashlib.sha256(data).hexdigest() + suffix
    path = _FILES.get(key)
    if path is None or not path.exists():
        path = scratch_dir() / key
        part = path.with_name(path.name + ".part")
        part.write_bytes(data)
        os.replace(part, path)
        _FILES[key] = path
    _FILES_BY_ID[id(data)] = (data, path)
    while len(_FILES_BY_ID) > 4:  # it keeps its bytes objects alive: only the latest runs'
        del _FILES_BY_ID[next(iter(_FILES_BY_ID))]
    return path


def scratch_dir() -> Path:
    """This process's private temp dir (`shared_file`'s files, a trial's scratch). Removed when the
    process exits (a pool worker too, forked or spawned), or, for a process that could not clean up
    (killed, or a Ray worker, which Ray ends with SIGKILL), by the next process that finds its owner gone."""
    if not _SCRATCH:
        _sweep_scratch()
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-")))
        atexit.register(_remove_scratch, _SCRATCH[0], os.getpid())
        # a pool worker forked by edgeq's fork server ends without atexit (os._exit), after multiprocessing's
        # finalizers: removed there too (the second removal of a folder does nothing)
        from multiprocessing import util

        util.Finalize(None, _remove_scratch, (_SCRATCH[0], os.getpid()), exitpriority=0)
    return _SCRATCH[0]


def _remove_scratch(folder: Path, owner: int) -> None:
    if os.getpid() == owner:  # not in a child that inherited the registration
        shutil.rmtree(folder, ignore_errors=True)


def _sweep_scratch() -> None:
    """Scratch dirs of this user's processes that no longer exist, removed."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_SCRATCH_PREFIX}*-*"):
        try:
            pid = int(folder.name[len(_SCRATCH_PREFIX):].split("-")[0])
            if folder.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, OSError):
            continue  # not ours, or its owner lives


# ---------------------------------------------------------------------------------------------------
# In this process


def _serial(fn: TrialFn, items: list, shared: Mapping[str, Any], display: _Display,
            clock: Clock) -> list[Trial | None]:
    host, pid, out = socket.gethostname(), os.getpid(), [None] * len(items)
    for i, item in enumerate(items):
        if not clock.may_start():
            break
        display(i, 1)
        clock.start(i)
        try:
            value = fn(shared, item)
        except Exception as exc:
            _noted(exc, i, items)
            raise
        out[i] = Trial(i, value, host, pid)
        clock.finish(i)
    display(sum(t is not None for t in out), 0)
    return out


class Clock:
    """A budget of trials (a run's, or a caller's own serial loop): whether a trial started now would end
    past it, by the mean time of the trials finished so far. With none finished yet every trial may start
    (one per worker, in practice), unless the budget is 0. Once a trial may not start, none may."""

    def __init__(self, budget_s: float = math.inf) -> None:
        self.budget_s, self.t0, self.closed = budget_s, time.perf_counter(), budget_s <= 0
        self.started: dict[int, float] = {}
        self.seconds: list[float] = []

    def may_start(self) -> bool:
        if not self.closed and self.seconds:
            mean = sum(self.seconds) / len(self.seconds)
            self.closed = time.perf_counter() - self.t0 + mean > self.budget_s
        return not self.closed

    def start(self, i: int) -> None:
        self.started.setdefault(i, time.perf_counter())

    def finish(self, i: int) -> None:
        self.seconds.append(time.perf_counter() - self.started[i])


# ---------------------------------------------------------------------------------------------------
# A process pool on this machine


_WORKER_SHARED: dict[str, Mapping[str, Any]] = {}


def set_process_threads(threads: int) -> None:
    """This process's intra-op thread counts, before it imports a runtime or whatever it imported already:
    the OpenMP/BLAS variables, torch's, and onnxruntime's default session options. For a process that
    shares the cores with others: a pool worker (`threads` 1, its start), a test worker under pytest-xdist."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    if "torch" in sys.modules:  # imported already: by the fork server (edgeq.worker_imports), or by a re-run __main__
        sys.modules["torch"].set_num_threads(threads)
    _onnxruntime_threads(threads)


def _onnxruntime_threads(threads: int) -> None:
    """In a pool worker, a new onnxruntime.SessionOptions starts at `threads` intra-op threads.

    onnxruntime sizes a session's pool to the machine's cores (OMP_NUM_THREADS and CPU affinity do not
    reach it), and its quantization tool builds its calibration and pre-processing sessions from a bare
    `onnxruntime.SessionOptions()`: two workers on two cores would run four spinning threads."""
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a dependency of edgeq
        return

    base = getattr(onnxruntime.SessionOptions, "edgeq_base", onnxruntime.SessionOptions)

    class SessionOptions(base):  # type: ignore[misc, valid-type]
        edgeq_base = base

        def __init__(self) -> None:
            super().__init__()
            self.intra_op_num_threads = threads
            self.inter_op_num_threads = 1

    onnxruntime.SessionOptions = SessionOptions


def _pool_call(fn: TrialFn, values: str, item: Any) -> tuple[Any, int]:
    """A pool task: the run's shared values read once per worker (from the run's file), then the trial."""
    shared = _WORKER_SHARED.get(values)
    if shared is None:
        _WORKER_SHARED.clear()  # one run's values per worker at a time
        shared = _WORKER_SHARED[values] = MappingProxyType(pickle.loads(Path(values).read_bytes()))
    return fn(shared, item), os.getpid()


def _check_picklable(fn: TrialFn) -> None:
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise ConfigError(f"{getattr(fn, '__qualname__', fn)!r}: a trial for a process pool must be a module-level "
                          f"function (it reaches the workers by name; {first_line(exc)})") from None


# ---------------------------------------------------------------------------------------------------
# A Ray cluster


_RAY_SHARED: dict[str, Mapping[str, Any]] = {}


def _ray_call(fn: TrialFn, box: list, item: Any, threads: int) -> tuple[Any, str, int, str]:
    """A Ray task: the run's shared values fetched once per worker process (`box` holds their ref
    unresolved), then the trial; its value comes back with where it ran."""
    import ray

    key = box[0].hex()
    shared = _RAY_SHARED.get(key)
    if shared is None:
        if threads:  # the worker's onnxruntime sessions get the task's CPUs
            _onnxruntime_threads(threads)
        _RAY_SHARED.clear()  # one run's values per worker at a time
        shared = _RAY_SHARED[key] = MappingProxyType(ray.get(box[0]))
    value = fn(shared, item)
    return value, socket.gethostname(), os.getpid(), ray.get_runtime_context().get_node_id()


def _import_ray(address: str):
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray {address}: Ray is not installed; {RAY_EXTRA}") from None
    return ray


def _connect(workers: Workers):
    """Ray, connected: this process's existing connection if it has one, else `ray.init(address)`."""
    address = workers.ray_address
    ray = _import_ray(address)
    if ray.is_initialized():
        return ray
    if address == "local":
        kwargs = {"num_cpus": workers.jobs} if workers.jobs else {}
        ray.init(address="local", include_dashboard=False, **kwargs)
        return ray
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address)
    except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError: Ray's own words
        raise ConfigError(f"--ray {address}: cannot connect ({first_line(exc, 160)}); check the address, and for a "
                          "cluster with token authentication set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN "
                          "or ~/.ray/auth_token) before starting") from None
    return ray


def _check_reachable(address: str) -> None:
    """One TCP connection to the head: a dead address fails in seconds, not after ray.init's minutes."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", str(RAY_DEFAULT_PORT))
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--ray {address}: nothing answers at {host}:{port} ({first_line(exc, 80)}); start a "
                          f"cluster there with `ray start --head --port={port}`, or use --ray local") from None


def offers(workers: Workers, resource: str) -> bool:
    """Whether the Ray cluster of `workers` has a node labelled with `resource` (`ray start --resources`);
    False without Ray. Connects, as a run would."""
    if workers.ray_address is None:
        return False
    return _connect(workers).cluster_resources().get(resource, 0) >= 1


def _check_resources(ray, workers: Workers) -> None:
    """Trials the cluster can never place would wait forever: say so now."""
    total = ray.cluster_resources()
    where = f"--ray {workers.ray_address}"
    if workers.cpus and total.get("CPU", 0) < workers.cpus:
        raise ConfigError(f"{where}: the cluster has {total.get('CPU', 0):g} CPUs and a trial needs {workers.cpus:g}; "
                          "add nodes with `ray start --address=HEAD --num-cpus=N`")
    for name, amount in workers.resources.items():
        if total.get(name, 0) < amount:
            raise ConfigError(f"{where}: no node offers {name} {amount:g} (the cluster has {total.get(name, 0):g}); "
                              f"label one with `ray start --address=HEAD --resources '{{\"{name}\": 1}}'`")


def _ray(ray, fn: TrialFn, items: list, shared: Mapping[str, Any], workers: Workers, display: _Display,
         clock: Clock, limit: int) -> list[Trial | None]:
    """Trials as Ray tasks, `shared` put once, SPREAD over the nodes; Ray re-runs a task whose worker
    or node died (max_retries), never one whose trial raised."""
    from ray.exceptions import RayTaskError

    box = [ray.put(dict(shared))]
    task = ray.remote(_ray_call).options(
        num_cpus=workers.cpus, resources=dict(workers.resources) or None, max_retries=workers.retries,
        retry_exceptions=False, scheduling_strategy="SPREAD")
    threads = int(workers.cpus) if workers.cpus >= 1 else 0  # cpus=0: a timed trial sets its own
    results, running, next_i, end = [None] * len(items), {}, 0, len(items)
    try:
        while next_i < end or running:
            while next_i < end and len(running) < limit:
                if not clock.may_start():
                    end = next_i  # past the budget: this trial and every later one stay None
                    break
                clock.start(next_i)
                running[task.remote(fn, box, items[next_i], threads)] = next_i
                next_i += 1
            display(next_i - len(running), len(running))
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                i = running.pop(ref)
                try:
                    value, host, pid, node = ray.get(ref)
                except RayTaskError as exc:  # the trial raised: also an instance of its exception's class
                    raise _noted(exc, i, items) from None
                except ray.exceptions.RayError as exc:
                    raise TrialError(f"{_name(i, items)}: lost on Ray {workers.retries + 1} times "
                                     f"({first_line(exc, 160)})") from None
                results[i] = Trial(i, value, host, pid, node)
                clock.finish(i)
        display(end, 0)
        return results
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


# ---------------------------------------------------------------------------------------------------
# Messages and progress


def _name(i: int, items: list) -> str:
    text = " ".join(repr(items[i]).split())
    return f"trial {i + 1} of {len(items)} ({text if len(text) <= 100 else text[:97] + '...'})"


def _noted(exc: BaseException, i: int, items: list) -> BaseException:
    """The trial's own exception, with a note naming the trial (Python 3.11+ shows notes)."""
    if hasattr(exc, "add_note"):
        exc.add_note(f"in {_name(i, items)}")
    return exc


class _Display:
    """Progress to a callback, to a bar on a terminal (edgeq.progress), or as lines in a log."""

    def __init__(self, progress: bool | ProgressFn, what: str, total: int, workers: int) -> None:
        self.callback = progress if callable(progress) else None
        self.what, self.total, self.workers = what, total, workers
        self.bar, self.shown, self.last = None, 0, (0, 0)
        self.logged = time.monotonic()
        if progress is True:
            from edgeq.progress import StageLine, progress_bar

            self.bar = progress_bar(total, what, unit="trials")
            self.lines = isinstance(self.bar, StageLine)

    def __call__(self, done: int, busy: int) -> None:
        if (done, busy) == self.last:
            return
        self.last = (done, busy)
        if self.callback is not None:
            self.callback(Progress(self.what, done, self.total, busy, self.workers))
        if self.bar is None:
            return
        self.bar.update(done - self.shown)
        self.shown = done
        self.bar.set_postfix(busy=f"{busy}/{self.workers}") if busy else self.bar.set_postfix(workers=self.workers)
        if self.lines and busy and time.monotonic() - self.logged >= LOG_EVERY_S:
            self.logged = time.monotonic()
            print(f"{self.what}: {done}/{self.total} done, {busy}/{self.workers} workers busy",
                  file=self.bar.file, flush=True)

    def __enter__(self) -> _Display:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------
# A ready trial


def qdq_accuracy(shared: Mapping[str, Any], cfg: Any) -> dict:
    """An fp32 ONNX file quantized to QDQ int8 with `cfg` (an edgeq.onnx_quant.QDQConfig) and scored on
    validation arrays -> edgeq.metrics.score (accuracy, agreement, SQNR against the fp32 logits).

    shared: "fp32" the fp32 ONNX file's bytes, "calibration" a list of input batches, "x" the
    validation inputs, "y" their labels, "ref" the fp32 model's logits on "x"."""
    from edgeq.metrics import score
    from edgeq.onnx_quant import quantize_onnx
    from edgeq.runtime import int8_session, load_onnx

    fp32 = shared_file(shared["fp32"], ".onnx")
    with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
        path = quantize_onnx(fp32, Path(tmp) / "int8.onnx", list(shared["calibration"]), cfg)
        logits = load_onnx(path, THREADS_PER_WORKER, int8_session(cfg.activations)).predict(shared["x"])
    return score(logits, shared["y"], shared["ref"])
