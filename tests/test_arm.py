"""The device checker on onnxruntime's aarch64 build, emulated (qemu-user, `make arm64`), on the
CPUs ARM boards have: cortex-a72 (Raspberry Pi 4, NEON only) and neoverse-n1 (dot product, as the
Cortex-A76 of a Pi 5). The bundle is tests/test_device.py's fresh tiny export (x86- and
arm64-target files where the recipe has targets); every ONNX file must agree with its golden
outputs, written on this x86 machine, within the stated tolerances.

Skipped, with one line, only where emulation cannot run at all (not root, or the arm64
environment could not be set up here); with CI set it fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_device import ROOT, bundle

ROOTFS = Path(os.environ.get("ARM64_ROOTFS", ROOT / ".arm64" / "rootfs"))
CPUS = ("cortex-a72", "neoverse-n1")
# the ISA flags each emulated CPU must show the checker (from the auxiliary vector, as onnxruntime reads them)
FLAGS = {"cortex-a72": ({"asimd"}, {"asimddp", "i8mm", "sve"}), "neoverse-n1": ({"asimd", "asimddp"}, {"i8mm", "sve"})}


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "the arm64 emulation needs root (chroot): run as root"
    if not (ROOTFS / ".edgeq-arm64-ready").is_file():
        return f"no arm64 environment at {ROOTFS}: run `make arm64`"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "qemu-aarch64 is not registered in binfmt_misc: run `make arm64`"
    return None


@pytest.fixture(scope="module")
def arm64_ready() -> None:
    reason = _cannot_run()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the emulated arm64 check: {reason}")
        pytest.skip(reason)


@pytest.mark.parametrize("cpu", CPUS)
def test_check_passes_on_emulated_arm(cpu: str, arm64_ready, tmp_path_factory: pytest.TempPathFactory,
                                      tmp_path: Path):
    directory = bundle(tmp_path_factory)
    report = tmp_path / "report.json"
    p = subprocess.run([str(ROOT / "tools" / "arm64-check.sh"), cpu, str(directory), "--rounds", "0", "--accuracy",
                        "--json", str(report)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    r = json.loads(report.read_text())
    assert r["cpu"]["machine"] == "aarch64" and r["cpu"]["emulated"] == f"qemu-user, QEMU_CPU={cpu}"
    must, must_not = FLAGS[cpu]
    assert must <= set(r["cpu"]["flags"]) and not must_not & set(r["cpu"]["flags"])
    onnx_files = [f for f in r["files"] if f["format"] == "onnx"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert len(onnx_files) == sum(a["format"] == "onnx" for a in manifest["artifacts"]) >= 2
    for f in onnx_files:  # every ONNX file ran on the ARM kernels and met its tolerance
        assert f["status"] == "ok" and f["fidelity"]["ok"], f
        assert f["accuracy"]["accuracy"] == next(a["accuracy"] for a in manifest["artifacts"] if a["name"] == f["name"])
    assert all(f["status"] == "not_checked" for f in r["files"] if f["format"] != "onnx")  # no torch in there


@pytest.mark.parametrize("cpu", CPUS)
def test_mnist_export_on_emulated_arm(cpu: str, arm64_ready, mlp_artifacts: Path, tmp_path: Path):
    """The suite's shared MNIST MLP export (tests/conftest.py): its golden outputs, written by the export
    on x86, are met by onnxruntime's ARM kernels."""
    manifest = json.loads((mlp_artifacts / "manifest.json").read_text())
    if "golden" not in manifest:
        pytest.fail("the export wrote no golden outputs (manifest.json has no 'golden')")
    report = tmp_path / "report.json"
    p = subprocess.run([str(ROOT / "tools" / "arm64-check.sh"), cpu, str(mlp_artifacts), "--rounds", "0",
                        "--json", str(report)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    files = [f for f in json.loads(report.read_text())["files"] if f["format"] == "onnx"]
    assert files and all(f["status"] == "ok" and f["fidelity"]["ok"] for f in files)
