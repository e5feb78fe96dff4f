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
