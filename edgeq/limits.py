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


def confine(writable: tuple[str, ...] = ("/dev/null",), files: bool = True) -> dict:
    """Take from this process, for good, what a hostile file would need to reach the machine through a runtime:
    with Linux's Landlock, no file may be written, created, removed, renamed or truncated except beneath
    `writable` (what is already open stays usable), no TCP port bound or connected, and (Landlock ABI 6+) no
    signal sent and no abstract unix socket reached outside this process and its children. Unprivileged;
    nothing else changes (reads, execution, memory). `files=False` leaves the file system out (the network and
    signal rules stay).

    Only this thread and the threads and processes it starts afterwards are confined: call it while the process
    has one thread, before the runtimes are imported. Returns what was confined, for the report: `landlock`
    (the kernel's ABI version) and the rules, or `landlock: None` and `why` where the kernel or platform has no
    Landlock (the process then runs unconfined, as before)."""
    import ctypes
    import struct
    import sys

    if not sys.platform.startswith("linux"):
        return {"landlock": None, "why": f"Landlock is Linux's; this is {sys.platform}"}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # _VERSION
    if abi < 1:
        return {"landlock": None, "why": f"the kernel has no Landlock ({os.strerror(ctypes.get_errno())})"}
    fs = _rights(_FS_WRITES, abi) if files else 0
    net, scoped = _rights(_NET, abi), _rights(_SCOPES, abi)
    attr = struct.pack("=QQQ", fs, net, scoped)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = libc.syscall(_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return {"landlock": None, "why": f"a Landlock ruleset was refused ({os.strerror(ctypes.get_errno())})"}
    try:
        allowed = [path for path in writable if fs and _allow_beneath(libc, ruleset, path, abi)]
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            return {"landlock": None, "why": f"Landlock was refused ({os.strerror(ctypes.get_errno())})"}
    finally:
        os.close(ruleset)
    return {"landlock": abi,
            "files": ("none written outside " + ", ".join(allowed) if allowed else "none written") if fs
            else "not confined",
            "network": "no TCP port bound or connected" if net else "not confined (Landlock ABI < 4)",
            "signals": "only to this process and its children" if scoped else "not confined (Landlock ABI < 6)"}


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
