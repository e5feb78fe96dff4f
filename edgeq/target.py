"""What a target CPU means for the files built for it: one frozen `Target` per target, read by the
recipe (which targets exist), the int8 stages (formats and engines), the timed decisions (whether this
machine may time them) and the device plan (which target a device is).

The formats follow onnxruntime's quantization guide for its kernels: x86 without VNNI runs U8S8
kernels whose 16-bit pair sums can saturate, hence uint8 activations and 7-bit weights
(`reduce_range`); ARM runs S8S8 (int8 activations, symmetric int8 weights) natively, where
`reduce_range` would only throw a bit of weight precision away. torch.ao's int8 kernels are the
`x86` engine on x86 and `qnnpack` on ARM. Standard library only: the device side imports it.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One target: its int8 formats, engines, timing policy and the machines it names."""

    name: str
    activations: str  # ONNX QDQ activations: "uint8" (U8S8) or "int8" (S8S8)
    reduce_range: bool  # 7-bit weights, for U8S8 kernels without VNNI
    torch_engine: str  # torch.ao's quantized engine for the TorchScript int8 files
    machines: tuple[str, ...]  # platform.machine() values of the CPUs that are this target

    def qdq(self) -> dict:
        """The QDQ format fields (edgeq.onnx_quant.QDQConfig) of this target's int8 ONNX files."""
        return {"activations": self.activations, "reduce_range": self.reduce_range}

    def timed_here(self, machine: str | None = None) -> bool:
        """Timing policy: a timed decision (speed search, ship rule, recommendation) is measured only on a
        CPU of the target; elsewhere its defaults stand and the device plan decides (docs/device.md)."""
        return (machine or platform.machine()) in self.machines


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("x86", activations="uint8", reduce_range=True, torch_engine="x86", machines=("x86_64", "AMD64", "i686")),
    Target("arm64", activations="int8", reduce_range=False, torch_engine="qnnpack", machines=("aarch64", "arm64")),
)}


def of(name: str) -> Target:
    """The Target named `name` (KeyError for an unknown one: the recipe refuses those first)."""
    return TARGETS[name]


def of_machine(machine: str | None = None) -> Target | None:
    """The target of a machine (this one by default), or None when edgeq builds for no such CPU."""
    machine = machine or platform.machine()
    return next((t for t in TARGETS.values() if machine in t.machines or machine.lower() in t.machines), None)


def here() -> Target:
    """This machine's target; an unknown CPU builds for x86's formats, as before targets existed."""
    return of_machine() or TARGETS["x86"]
