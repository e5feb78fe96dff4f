"""Resource bounds a process puts on itself before it runs files it did not write: verify's worker and
the device checker. Standard library only (the device checker imports it on a device).
"""

from __future__ import annotations

import os


def physical_memory_gb() -> float:
    """This machine's physical memory, in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def cap_memory(extra_gb: float) -> float | None:
    """Limit this process's private writable memory (RLIMIT_DATA: heap, anonymous mappings, thread stacks) to
    what it uses now plus `extra_gb` GiB; the GiB it may add, or None if unsupported. Call it after the
    runtimes are imported: what they take then is not charged.

    Not the address space (RLIMIT_AS): runtimes reserve address space they never touch (ExecuTorch's XNNPACK
    268 MiB at its first int8 program, glibc 64 MiB per malloc arena), and a cap on it failed the intact
    MNIST export at 1 GiB. Private writable memory is what a file can make a runtime allocate.
    """
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as f:
            now = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, StopIteration):
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = now + int(extra_gb * 2**30)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        return round((soft - now) / 2**30, 1)  # the limit we inherited is already tighter
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    return extra_gb


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# Landlock (Linux 5.13+; edgeq.limits.confine): its system calls, which are the same on every architecture, and
# the rights that change something. Reads and execution stay allowed: a runtime reads its own libraries.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
# (right, first ABI that has it); "file" rights apply to a file itself, the others to what a directory holds
_FS_WRITES = {"write_file": (1 << 1, 1), "remove_dir": (1 << 4, 1), "remove_file": (1 << 5, 1),
              "make_char": (1 << 6, 1), "make_dir": (1 << 7, 1), "make_reg": (1 << 8, 1), "make_sock": (1 << 9, 1),
              "make_fifo": (1 << 10, 1), "make_block": (1 << 11, 1), "make_sym": (1 << 12, 1), "refer": (1 << 13, 2),
              "truncate": (1 << 14, 3), "ioctl_dev": (1 << 15, 5)}
_FILE_RIGHTS = ("write_file", "truncate", "ioctl_dev")
_NET = {"bind_tcp": (1 << 0, 4), "connect_tcp": (1 << 1, 4)}
_SCOPES = {"abstract_unix_socket": (1 << 0, 6), "signal": (1 << 1, 6)}


def _rights(table: dict, abi: int, names=None) -> int:
    return sum(bit for name, (bit, since) in table.items() if since <= abi and (names is None or name in names))


def confine(writable: tuple[str, ...] = ("/dev/null", "/dev/shm"), files: bool = True,
            probe: str | None = None, sockets: bool = True) -> dict:
    """Take from this process, for good, what a hostile file would need to reach the machine through a runtime:
    with Linux's Landlock, no file may be written, created, removed, renamed or truncated except beneath
    `writable` (what is already open stays usable), no TCP port bound or connected, and (Landlock ABI 6+) no
    signal sent and no abstract unix socket reached outside this process and its children; with a seccomp
    filter, no socket of any kind opened (unix sockets with a path, UDP and netlink are outside Landlock).
    Unprivileged; nothing else changes (reads, execution, memory). `files=False` leaves the file system out,
    `sockets=False` the seccomp filter.
    `/dev/shm` is writable by default: OpenMP runtimes register themselves there and abort when they cannot.

    Only this thread and the threads and processes it starts afterwards are confined: call it while the process
    has one thread, before the runtimes are imported. Returns what was confined, for the report: `landlock`
    (the kernel's ABI version) and the rules, or `landlock: None` and `why` where there is no Landlock (the
    files then run with the user's rights, as before), and `sockets`. With `probe`, a directory outside
    `writable`, the file rules are then tried there (`checked`)."""
    import sys

    if not sys.platform.startswith("linux") or hasattr(sys, "getandroidapilevel"):
        # Android's app seccomp policy kills a process that makes a system call it does not list
        return {"landlock": None, "why": f"not confined on {sys.platform}", "sockets": "not confined"}
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # what both need from an unprivileged process
        return {"landlock": None, "why": f"no_new_privs was refused ({os.strerror(ctypes.get_errno())})",
                "sockets": "not confined"}
    out = _landlock(libc, writable, files)
    if out["landlock"] and probe and out["files"] != "not confined":  # seen to hold, not only asked for
        out["checked"] = _probe(probe)
    return {**out, "sockets": _no_sockets(libc) if sockets else "not confined"}


def _landlock(libc, writable: tuple[str, ...], files: bool) -> dict:
    import ctypes
    import struct

    abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # _VERSION
    if abi < 1:
        return {"landlock": None, "why": os.strerror(ctypes.get_errno())}
    fs = _rights(_FS_WRITES, abi) if files else 0
    net, scoped = _rights(_NET, abi), _rights(_SCOPES, abi)
    if not (fs or net or scoped):
        return {"landlock": None, "why": f"Landlock ABI {abi} has no rule for the network or signals, and the "
                                         "file system is left out here"}
    attr = struct.pack("=QQQ", fs, net, scoped)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = libc.syscall(_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return {"landlock": None, "why": f"a Landlock ruleset was refused ({os.strerror(ctypes.get_errno())})"}
    try:
        allowed = [path for path in writable if fs and _allow_beneath(libc, ruleset, path, abi)]
        if libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            return {"landlock": None, "why": f"Landlock was refused ({os.strerror(ctypes.get_errno())})"}
    except OSError as exc:
        return {"landlock": None, "why": str(exc)}
    finally:
        os.close(ruleset)
    writes = "written, created, removed or renamed" + (", or truncated by path," if abi < 3 else "")
    return {"landlock": abi,
            "files": (f"none {writes} outside " + ", ".join(allowed) if allowed else f"none {writes}") if fs
            else "not confined",
            "network": "no TCP port bound or connected" if net else "not confined (Landlock ABI < 4)",
            "signals": "only to this process and its children" if scoped else "not confined (Landlock ABI < 6)"}


def _probe(directory: str) -> str:
    refused = refused_write(directory)
    if refused is None:
        return f"NOT confined: a file could be created in {directory}"
    if refused.endswith("(errno 13)"):  # EACCES: what Landlock answers
        return f"creating a file in {directory} was refused: {refused}"
    return f"inconclusive: creating a file in {directory} failed for another reason: {refused}"


# seccomp: (AUDIT_ARCH_*, (socket, socketpair)) of the machines edgeq's device checker runs on
_SECCOMP_ARCH = {"x86_64": (0xC000003E, (41, 53)), "aarch64": (0xC00000B7, (198, 199))}
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


def _no_sockets(libc) -> str:
    """A seccomp filter: socket(2) and socketpair(2) fail with EPERM (and every system call of another ABI: a
    32-bit or x32 call would go around the numbers). Sockets already open stay usable."""
    import ctypes
    import struct

    machine = os.uname().machine
    if machine not in _SECCOMP_ARCH:
        return f"not confined (no filter for {machine})"
    arch, (socket_nr, pair_nr) = _SECCOMP_ARCH[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    program = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny), (ld, 0, 0, 0), (jge, 3, 0, 0x40000000),
               (jeq, 2, 0, socket_nr), (jeq, 1, 0, pair_nr), (ret, 0, 0, allow), (ret, 0, 0, deny)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in program))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Program(len(program), ctypes.addressof(code))
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        return f"not confined (seccomp was refused: {os.strerror(ctypes.get_errno())})"
    return "none opened (seccomp)"


def describe(confinement: dict | None, who: str) -> str:
    """One sentence for a report: what `who` (say "the files ran in a worker") could not do, per `confine`."""
    c = confinement or {"landlock": None, "why": "not recorded"}
    sockets = f"; sockets: {c['sockets']}" if c.get("sockets") else ""
    if not c.get("landlock"):
        return f"sandbox: no Landlock ({c['why']}){sockets}; the files ran with this user's rights."
    return (f"sandbox: {who} confined by Landlock (ABI {c['landlock']}): files {c['files']}; network: {c['network']}; "
            f"signals: {c['signals']}{sockets}" + (f" ({c['checked']})." if c.get("checked") else "."))


def _allow_beneath(libc, ruleset: int, path: str, abi: int) -> bool:
    """One rule: every handled write right beneath `path` (a file: the rights a file has). False when `path`
    does not exist here."""
    import ctypes
    import stat
    import struct

    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        names = None if stat.S_ISDIR(os.fstat(fd).st_mode) else _FILE_RIGHTS
        rule = struct.pack("=Qi", _rights(_FS_WRITES, abi, names), fd)  # landlock_path_beneath_attr (packed)
        if libc.syscall(_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, rule, 0) != 0:
            raise OSError(ctypes.get_errno(), f"Landlock refused a rule for {path}")
        return True
    finally:
        os.close(fd)


def temp_dir() -> str | None:
    """The temp directory, found (by writing a file there) before writes are refused; None when none is writable."""
    import tempfile

    try:
        return tempfile.gettempdir()
    except OSError:
        return None


def refused_write(directory: str) -> str | None:
    """Whether a confined process really may not create a file in `directory` (a place outside its rules):
    the error that refused it, or None when the file could be created (it is removed again)."""
    path = os.path.join(directory, f".edgeq-confined-{os.getpid()}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        return f"{os.strerror(exc.errno)} (errno {exc.errno})" if exc.errno else str(exc)
    os.unlink(path)
    return None


MAX_REPLY_BYTES = 64 * 2**20  # what a confined child may send back (a device check's report is some KiB)
class GaveUp(Exception):
    """The confined child was stopped because a watched step (`Watch`) outlived its limit: `value` names it
    (file, limit_s, step), for the caller to run it again without that file."""

    def __init__(self, value: dict) -> None:
        super().__init__(str(value))
        self.value = value


class Watch:
    """A page shared with the confined child (created before the fork): the child marks the step under way
    (`begin`: a file's name, its limit, what it does; `end`), and `in_confined_child`, in the parent, stops the
    child when a step outlives its limit. The parent needs no lock the child holds, so this reaches a runtime
    that keeps Python's lock for a whole call (ExecuTorch's binding does)."""

    _HEAD = "=ddii"  # started (time.monotonic, 0: none), limit_s, step (0: loading it, 1: a call), name length
    STEPS = ("loading it", "a call")

    def __init__(self) -> None:
        import mmap

        self.page = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: the child writes, the parent reads

    def name(self, file: str) -> bytes:
        return file.encode("utf-8", "replace")[:4000]

    def begin(self, name: bytes, limit_s: float, step: int) -> None:
        import struct
        import time

        self.page[24:24 + len(name)] = name
        struct.pack_into(self._HEAD, self.page, 0, time.monotonic(), limit_s, step, len(name))

    def end(self) -> None:
        import struct

        struct.pack_into("=d", self.page, 0, 0.0)

    def overdue(self) -> dict | None:
        """The step past its limit, or None."""
        import struct
        import time

        started, limit_s, step, n = struct.unpack_from(self._HEAD, self.page, 0)
        if not started or time.monotonic() - started <= limit_s:
            return None
        name = bytes(self.page[24:24 + max(0, min(n, 4000))]).decode("utf-8", "replace")
        return {"file": name, "limit_s": limit_s, "step": self.STEPS[step] if step in (0, 1) else "a step"}


OUTPUT_FORWARDED = 1 << 20  # bytes of a confined child's output passed on as they come (its log lines)
OUTPUT_TAIL = 64 * 1024  # past that, only its last bytes are kept, and passed on when it ends


class OutputTail:
    """A child's output (what its runtimes print, a TorchScript file's `print` included), drained from `pipe` by a
    thread as it is written: the first `forward_limit` bytes are passed on to `forward` as they come, the rest is
    kept only as its last `tail` bytes. A file that prints without end costs the reader neither disk nor memory,
    and fills no log or terminal. `finish` passes the kept tail on, after a line saying what was left out."""

    def __init__(self, pipe, forward=None, forward_limit: int = 0, tail: int = OUTPUT_TAIL) -> None:
        import codecs
        import threading

        self._pipe, self._forward, self._room, self._tail = pipe, forward, forward_limit if forward else 0, tail
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character split between reads
        self._kept, self._dropped, self._lock = bytearray(), 0, threading.Lock()
        self._line_ended = True  # what was passed on last ended a line
        self._thread = threading.Thread(target=self._drain, name="edgeq-child-output", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        fd = self._pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                return
            if not chunk:  # the child and everything that shares its output are gone
                return
            now, chunk = chunk[: self._room], chunk[self._room:]
            self._room -= len(now)
            if now:  # outside the lock: a stream that stalls never holds `kept`
                self._pass_on(now)
            with self._lock:
                self._kept += chunk
                self._dropped += max(0, len(self._kept) - self._tail)
                del self._kept[: -self._tail]

    def _pass_on(self, data: bytes, final: bool = False) -> None:
        self._line_ended = data.endswith(b"\n")
        try:
            self._forward.write(self._text.decode(data, final))
            self._forward.flush()
        except Exception:  # noqa: BLE001 - a stream that cannot take it (closed, another encoding): the drain goes
            pass  # on, or the child would block on a full pipe

    def kept(self, wait_s: float = 2.0) -> bytes:
        """The kept tail, once the child's last writes are drained (at most `wait_s` after it ended)."""
        self._thread.join(wait_s)
        with self._lock:
            return bytes(self._kept)

    def text(self, wait_s: float = 2.0) -> str:
        return self.kept(wait_s).decode(errors="replace")

    def finish(self, what: str = "the checking process") -> None:
        """Pass the kept tail on (after a line saying how much was left out before it, if anything was), then
        close."""
        tail = self.kept()
        if self._forward is not None and tail:
            if self._dropped:  # the tail starts where the passing on stopped being whole
                said = f"[{self._dropped} bytes of {what}'s output left out; its last {len(tail)} follow]\n"
                self._pass_on(("" if self._line_ended else "\n").encode() + said.encode(), final=True)
                self._text.reset()
            self._pass_on(tail, final=True)
        self.close()

    def close(self) -> None:
        self._thread.join(2.0)
        if not self._thread.is_alive():  # never closed under a read that is still running
            self._pipe.close()


WATCH: list[Watch] = []  # in a confined child that was given one: its Watch


def in_confined_child(fn, writable: tuple[str, ...] = ("/dev/null", "/dev/shm"), watch: Watch | None = None) -> dict:
    """`fn(confinement)` run in a forked child that first confines itself (`confine`): -> the JSON-able dict it
    returns. For a process that must keep its own rights (to write its report, to remove its private copy)
    while files it did not write run. An EdgeqError or ModuleNotFoundError the child raises is raised here
    again, same class and message; a child that dies (a runtime crashed, a signal) is a one-line EdgeqError;
    with `watch`, a step the child marks there (`WATCH[0]` in the child) that outlives its limit stops the
    child: GaveUp.
    Off Linux `fn` runs here, unconfined, and says so. The reply is JSON, never pickle: this process runs no
    code the child sends.

    The child starts its own session (no controlling terminal to type into), reads nothing from stdin, keeps
    no other inherited descriptor than its reply pipe and its output pipe, and dies with this process. Its stdout
    and stderr are that one pipe: what it prints reaches this process's stderr, never its stdout (a report
    written there), and only its first OUTPUT_FORWARDED bytes and last OUTPUT_TAIL (OutputTail)."""
    import signal
    import sys

    from edgeq.errors import EdgeqError

    if not sys.platform.startswith("linux"):
        return fn({"landlock": None, "why": f"not confined on {sys.platform}", "sockets": "not confined"})
    sys.stdout.flush()
    sys.stderr.flush()  # or the child writes what is buffered here a second time
    r, w = os.pipe()
    out_r, out_w = os.pipe()  # the child's stdout and stderr: passed on here, bounded (OutputTail)
    stops = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # until the child has its own handlers
    parent = os.getpid()
    try:
        pid = _fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for fd in (r, w, out_r, out_w):
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - the child; its coverage is the tests' subprocesses
        try:
            WATCH[:] = [watch] if watch is not None else []
            for fd, name in ((1, "stdout"), (2, "stderr")):  # Python's streams too, whatever the parent's were
                os.dup2(out_w, fd)
                setattr(sys, name, open(fd, "w", buffering=1, errors="replace", closefd=False))  # noqa: SIM115
            _child(fn, r, w, writable, blocked, parent)
        finally:
            os._exit(1)  # never back into the caller's code
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    os.close(w)
    os.close(out_w)
    output = OutputTail(os.fdopen(out_r, "rb", buffering=0), sys.stderr, OUTPUT_FORWARDED)
    try:
        reply = _read_reply(r, pid, watch)
    finally:
        os.close(r)
        _reap(pid)
        output.finish()
    if reply is None:
        raise EdgeqError(f"the checking process died ({_died(pid)}) before it reported: a file may have crashed a "
                         "runtime or outgrown the memory limit; check the files one by one to find it")
    _STATUS.pop(pid, None)
    return _value(reply)


def _value(reply: dict) -> dict:
    """The child's value, or what it raised (or `_read_reply`'s GaveUp) raised here again."""
    from edgeq.errors import EdgeqError

    if "gave_up" in reply:  # written by _read_reply, never by the child
        raise GaveUp(reply["gave_up"])
    if "error" in reply:
        message = str(reply["error"].get("message"))
        if reply["error"].get("type") == "ModuleNotFoundError":
            raise ModuleNotFoundError(message, name=str(reply["error"].get("name")))
        try:
            error = _error_class(reply["error"].get("type"))(message)
        except TypeError:  # a class with other arguments
            error = EdgeqError(message)
        raise error
    return reply["value"]


def _fork() -> int:
    import warnings

    with warnings.catch_warnings():  # Python 3.12+ warns when a threaded process forks: the child runs no thread
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent (pid `parent`) dies, so that no runaway child outlives a
    killed verify or device check; ends now if the parent is already gone."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the line above
            os._exit(0)


def _child(fn, r: int, w: int, writable: tuple[str, ...], mask, parent: int) -> None:  # pragma: no cover
    import json
    import signal
    import sys
    import traceback

    from edgeq.errors import EdgeqError

    code = 0
    try:
        os.close(r)
        signal.set_wakeup_fd(-1)  # the parent's stop watch listens there (closed below with the rest)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)  # the parent cleans up and kills this child
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        die_with_parent(parent)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.closerange(3, w)
        os.closerange(w + 1, _max_fd())
        probe = temp_dir()
        try:
            reply = {"value": fn(confine(writable, probe=probe))}
        except EdgeqError as exc:
            reply = {"error": {"type": type(exc).__name__, "message": str(exc)}}
        except ModuleNotFoundError as exc:  # a runtime not installed here: the caller prints its pip line
            reply = {"error": {"type": "ModuleNotFoundError", "message": str(exc), "name": exc.name}}
        view = memoryview(json.dumps(reply).encode())
        while view:
            view = view[os.write(w, view):]
    except BaseException:  # noqa: BLE001 - anything else: shown as the parent would have shown it, no reply
        code = 1
        with _quiet():
            traceback.print_exc()
    finally:
        with _quiet():
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _quiet():
    import contextlib

    return contextlib.suppress(BaseException)


def _max_fd() -> int:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if 0 < soft < 1 << 20 else 1 << 16


def _read_reply(r: int, pid: int, watch: Watch | None = None) -> dict | None:
    """The child's JSON, read until the pipe closes, or until the child has ended and sent nothing more (something
    it started may still hold the pipe open); `{"gave_up": ...}` when `watch` shows a step past its limit (the
    child is then stopped by the caller's `_reap`)."""
    import json
    import select

    from edgeq.errors import EdgeqError

    chunks, size = [], 0
    while True:
        ready = select.select([r], [], [], 0.25)[0]
        if watch is not None and (late := watch.overdue()):
            return {"gave_up": late}
        if not ready:
            if _ended(pid):
                break
            continue
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise EdgeqError(f"the checking process sent more than {MAX_REPLY_BYTES >> 20} MiB back; it was stopped "
                             "(a file may have taken it over)")
        chunks.append(chunk)
    if not chunks:
        return None
    try:
        reply = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict) or "gave_up" in reply or not ("value" in reply
                                                               or isinstance(reply.get("error"), dict)):
        raise EdgeqError("the checking process sent back something it never sends; it was stopped (a file may "
                         "have taken it over)")
    return reply


def _ended(pid: int) -> bool:
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    if done:
        _STATUS[pid] = status
    return bool(done)


_STATUS: dict[int, int] = {}  # pid -> wait status, for the message about a child that died


def _reap(pid: int) -> None:
    """The child stopped for good: killed if it still runs (an interrupted parent), then waited for."""
    import signal

    if pid in _STATUS:
        return
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            os.kill(pid, signal.SIGKILL)
            done, status = os.waitpid(pid, 0)
        _STATUS[pid] = status
    except ChildProcessError:
        pass


def _died(pid: int) -> str:
    import signal

    status = _STATUS.pop(pid, None)
    if status is None:
        return "unknown status"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"signal {signal.Signals(sig).name}" if sig in signal.Signals._value2member_map_ else f"signal {sig}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _error_class(name: object) -> type:
    """The EdgeqError subclass of that name (the child raised it), else EdgeqError itself."""
    from edgeq.errors import EdgeqError

    seen, todo = {}, [EdgeqError]
    while todo:
        cls = todo.pop()
        seen.setdefault(cls.__name__, cls)
        todo += cls.__subclasses__()
    return seen.get(name, EdgeqError) if isinstance(name, str) else EdgeqError
