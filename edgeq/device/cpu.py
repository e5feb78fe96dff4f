"""What machine the checker runs on: CPU model, ISA flags, runtimes. Standard library only.

On aarch64 the features come from the auxiliary vector (getauxval(AT_HWCAP/AT_HWCAP2)), which is
also what onnxruntime reads there, and what qemu-user fills from QEMU_CPU; /proc/cpuinfo names the
core where it is mounted. On x86 the flags come from /proc/cpuinfo.
"""

from __future__ import annotations

import os
import platform
import sys

# bit -> name, from the Linux arm64 uapi (asm/hwcap.h)
HWCAP = {0: "fp", 1: "asimd", 3: "aes", 4: "pmull", 5: "sha1", 6: "sha2", 7: "crc32", 8: "atomics", 9: "fphp",
         10: "asimdhp", 12: "asimdrdm", 13: "jscvt", 14: "fcma", 15: "lrcpc", 16: "dcpop", 17: "sha3", 18: "sm3",
         19: "sm4", 20: "asimddp", 21: "sha512", 22: "sve", 23: "asimdfhm", 24: "dit", 25: "uscat", 26: "ilrcpc",
         27: "flagm", 28: "ssbs", 29: "sb", 30: "paca", 31: "pacg"}
HWCAP2 = {0: "dcpodp", 1: "sve2", 2: "sveaes", 3: "svepmull", 4: "svebitperm", 5: "svesha3", 6: "svesm4",
          7: "flagm2", 8: "frint", 9: "svei8mm", 10: "svef32mm", 11: "svef64mm", 12: "svebf16", 13: "i8mm",
          14: "bf16", 15: "dgh", 16: "rng", 17: "bti", 18: "mte"}
AT_HWCAP, AT_HWCAP2 = 16, 26
# the flags that decide which int8 kernels run
INT8_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "sve2", "svei8mm", "avx2", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx_vnni", "amx_int8")
# MIDR part numbers of ARM Ltd (implementer 0x41) cores edgeq targets
ARM_PARTS = {0xD03: "Cortex-A53", 0xD05: "Cortex-A55", 0xD08: "Cortex-A72", 0xD0B: "Cortex-A76", 0xD0C: "Neoverse-N1",
             0xD0D: "Cortex-A77", 0xD41: "Cortex-A78", 0xD42: "Cortex-A78AE", 0xD40: "Neoverse-V1",
             0xD44: "Cortex-X1", 0xD46: "Cortex-A510", 0xD47: "Cortex-A710", 0xD49: "Neoverse-N2",
             0xD4F: "Neoverse-V2"}


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _field(text: str, name: str) -> str | None:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def _auxv_flags() -> list[str]:
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return []
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    hw, hw2 = getauxval(AT_HWCAP), getauxval(AT_HWCAP2)
    return ([name for bit, name in HWCAP.items() if hw >> bit & 1]
            + [name for bit, name in HWCAP2.items() if hw2 >> bit & 1])


def describe() -> dict:
    """CPU model, architecture, cores, ISA flags (all, and those that pick int8 kernels)."""
    text = _cpuinfo()
    machine = platform.machine()
    if machine in ("aarch64", "arm64"):
        flags = _auxv_flags()
        part = _field(text, "CPU part")
        model = None
        if part and (_field(text, "CPU implementer") or "").lower() == "0x41":
            model = ARM_PARTS.get(int(part, 16), f"ARM part {part}")
        model = model or _field(text, "model name") or "unknown (no /proc/cpuinfo)"
    else:
        flags = (_field(text, "flags") or "").split()
        model = _field(text, "model name") or platform.processor() or "unknown"
    out = {"model": model, "machine": machine, "cores": os.cpu_count(),
           "int8_flags": [f for f in INT8_FLAGS if f in flags], "flags": sorted(flags)}
    if os.environ.get("QEMU_CPU"):
        out["emulated"] = f"qemu-user, QEMU_CPU={os.environ['QEMU_CPU']}"
    return out


def runtimes() -> dict:
    import numpy
    import onnxruntime

    return {"python": platform.python_version(), "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__,
            "providers": onnxruntime.get_available_providers(), "platform": sys.platform}
