"""The device checker on onnxruntime's aarch64 build, emulated (qemu-user, `make arm64`), on the
CPUs ARM boards have: cortex-a72 (Raspberry Pi 4, NEON only) and neoverse-n1 (dot product, as the
Cortex-A76 of a Pi 5).

The bundle is built here once: both MNIST example models (MLP and CNN, edgeq.examples.mnist, one
epoch each) in one `edgeq.compress`, each exported for both targets (`x86`: U8S8 with
`reduce_range`; `arm64`: S8S8), fp32 and static int8 ONNX files. On each CPU every ONNX file must
agree with its golden outputs, written on this x86 machine, within the stated tolerances, and its
accuracy on eval.npz must equal the manifest's. The test split is cut to its first TEST_SAMPLES
digits, so that eval.npz is the whole split the manifest's accuracy was measured on and the
emulated runs stay short.

Skipped, with one line, only where emulation cannot run at all (not root, or the arm64
environment could not be set up here); with CI set it fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_device import ROOT

pytestmark = pytest.mark.slow  # left out of `make test-fast`

ROOTFS = Path(os.environ.get("ARM64_ROOTFS", ROOT / ".arm64" / "rootfs"))
CPUS = ("cortex-a72", "neoverse-n1")
# the ISA flags each emulated CPU must show the checker (from the auxiliary vector, as onnxruntime reads them)
FLAGS = {"cortex-a72": ({"asimd"}, {"asimddp", "i8mm", "sve"}), "neoverse-n1": ({"asimd", "asimddp"}, {"i8mm", "sve"})}
ARCHS, TARGETS = ("mlp", "cnn"), ("x86", "arm64")
TEST_SAMPLES = 300  # of the 1,000 test digits: each emulated check of the 8 ONNX files takes ~12 s here
CHANCE = 0.1  # ten classes
FORMATS = {"x86": ("uint8", True), "arm64": ("int8", False)}  # int8 activations and reduce_range per target


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


@pytest.fixture(scope="module")
def mnist_bundle(arm64_ready, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLP and CNN trained one epoch each, exported for x86 and arm64 in one manifest (four families)."""
    import edgeq
    from edgeq.examples import mnist

    train, val, test = mnist.splits(mnist.load_data())
    models = {arch: mnist.train_model(arch, train, epochs=1, progress=False) for arch in ARCHS}
    # no speed search, no sensitivity, no programs; every int8 file ships whatever its speed here
    recipes = {f"{arch}-{target}": edgeq.Recipe(
        variants=("static",), sensitivity=False, calibration_methods=("MinMax",), calibration_sizes=(128,),
        calibration_samples=128, batches=(1,), search_budget_s=0.01, ship_rule="always", executorch=False,
        target=target) for arch in ARCHS for target in TARGETS}
    out = tmp_path_factory.mktemp("arm") / "mnist"
    edgeq.compress({family: models[family.split("-")[0]] for family in recipes}, train=(train.x, train.y),
                   val=(val.x, val.y), test=(test.x[:TEST_SAMPLES], test.y[:TEST_SAMPLES]), out=out,
                   recipe=recipes, progress=False, log=lambda _: None)
    manifest = json.loads((out / "manifest.json").read_text())
    for family in recipes:  # one epoch is far above chance, and every family ships fp32 and int8 ONNX files
        onnx = {a["precision"]: a for a in manifest["artifacts"] if a["model"] == family and a["format"] == "onnx"}
        assert set(onnx) == {"fp32", "int8"}, manifest["skipped"]
        assert onnx["fp32"]["accuracy"] > 7 * CHANCE, onnx["fp32"]
        q = onnx["int8"]["quantization"]  # the target's int8 format: U8S8 with reduce_range, or S8S8
        assert (q["activations"], q["reduce_range"]) == FORMATS[family.split("-")[1]], q
    assert {a["name"] for a in manifest["artifacts"] if a["format"] == "onnx"} <= set(manifest["golden"]["outputs"])
    return out


@pytest.mark.parametrize("cpu", CPUS)
def test_mnist_models_pass_the_check_on_emulated_arm(cpu: str, mnist_bundle: Path, tmp_path: Path):
    report = tmp_path / "report.json"
    p = subprocess.run([str(ROOT / "tools" / "arm64-check.sh"), cpu, str(mnist_bundle), "--rounds", "0", "--accuracy",
                        "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    r = json.loads(report.read_text())
    assert r["cpu"]["machine"] == "aarch64" and r["cpu"]["emulated"] == f"qemu-user, QEMU_CPU={cpu}"
    must, must_not = FLAGS[cpu]
    assert must <= set(r["cpu"]["flags"]) and not must_not & set(r["cpu"]["flags"])
    manifest = json.loads((mnist_bundle / "manifest.json").read_text())
    want = {a["name"]: a for a in manifest["artifacts"] if a["format"] == "onnx"}
    onnx_files = {f["name"]: f for f in r["files"] if f["format"] == "onnx"}
    assert set(onnx_files) == set(want) and len(want) == len(ARCHS) * len(TARGETS) * 2
    for name, f in onnx_files.items():  # every ONNX file ran on the ARM kernels and met its tolerance
        assert f["status"] == "ok" and f["fidelity"]["ok"], f
        assert f["accuracy"]["same_samples_as_manifest"] and f["accuracy"]["samples"] == TEST_SAMPLES, f["accuracy"]
        assert f["accuracy"]["accuracy"] == want[name]["accuracy"], (name, f["accuracy"])
    assert all(f["status"] == "not_checked" for f in r["files"] if f["format"] != "onnx")  # no torch in there
