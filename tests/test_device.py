"""The device side: golden outputs (edgeq.golden) and the torch-free checker (python -m edgeq.device check).

One tiny real export (an MLP on synthetic data, fp32 + static int8, TorchScript and ONNX, and
ExecuTorch programs where ExecuTorch is installed) is built once per session by `bundle()`; each
test that damages a file works on its own copy. tests/test_arm.py checks the MNIST models under
emulation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeq import golden

ROOT = Path(__file__).resolve().parents[1]
_BUNDLE: dict[str, Path] = {}
DEVICE_PACKAGES = ("numpy", "onnxruntime", "onnx", "sympy", "cryptography")  # check: the first two; plan: onnx, sympy


def _distributions(names: tuple[str, ...]) -> dict:
    """The installed distributions of `names` and everything they require (extras aside)."""
    import importlib.metadata as md
    import re

    seen: dict = {}
    todo = list(names)
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(key)
        except md.PackageNotFoundError:
            continue
        seen[key] = dist
        todo += [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in dist.requires or [] if "extra ==" not in r]
    return seen


def device_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv as on a device: numpy, onnxruntime (and for the plan onnx, sympy; for signatures
    cryptography) with their requirements, linked from this environment, and edgeq from the source
    tree; torch, click, matplotlib, jsonschema, model-signing are not installed there."""
    if "python" not in _BUNDLE:
        _BUNDLE["python"] = venv_with(tmp_path_factory.mktemp("device-venv"), DEVICE_PACKAGES)
    return _BUNDLE["python"]


def venv_with(root: Path, packages: tuple[str, ...]) -> Path:
    """A venv under `root` holding `packages` and what they require, linked from this environment, and edgeq
    from the source tree; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    links = root / "site"
    links.mkdir()
    for dist in _distributions(packages).values():
        for f in dist.files or []:
            top = f.parts[0]
            if top.endswith(".data") or top in ("..", "__pycache__") or (links / top).exists():
                continue
            (links / top).symlink_to(Path(dist.locate_file(top)))  # packages, modules and metadata
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "device.pth").write_text(f"{links}\n{ROOT}\n")
    return python


def _synthetic(n: int = 700, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 16, 16)).astype(np.float32)
    y = (x.reshape(n, -1) @ rng.normal(size=(256, 10))).argmax(1)
    return x, y


def _model():
    import torch
    from torch import nn

    x, y = _synthetic()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    return m.eval(), x, y


def _recipe(**target):
    import edgeq

    # no speed search, and every int8 file ships whatever its speed here: the tests need an int8 ONNX file
    return edgeq.Recipe(variants=("static",), sensitivity=False, calibration_methods=("MinMax",),
                        calibration_sizes=(64,), calibration_samples=64, batches=(1, 32), search_budget_s=0.01,
                        ship_rule="always", pte_observers=("histogram",), **target)


def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny export (built on first use): one family per target."""
    if "dir" not in _BUNDLE:
        import edgeq

        m, x, y = _model()
        _BUNDLE["model"] = (m, x, y)
        models = {"x86": m, "arm64": m}  # one family per target
        recipes = {k: _recipe(target=k) for k in models}
        _BUNDLE["recipes"] = recipes
        out = tmp_path_factory.mktemp("device") / "bundle"
        edgeq.compress(models, train=(x[:500], y[:500]), test=(x[500:], y[500:]), out=out, recipe=recipes,
                       progress=False, log=lambda _: None)
        manifest = json.loads((out / "manifest.json").read_text())
        for model in models:  # every family ships an int8 ONNX file for the checks to run on
            assert any(a["model"] == model and a["format"] == "onnx" and a["precision"] == "int8"
                       for a in manifest["artifacts"]), manifest["skipped"]
        onnx_names = {a["name"] for a in manifest["artifacts"] if a["format"] == "onnx"}
        assert onnx_names <= set(manifest["golden"]["outputs"])  # the export wrote every file's golden outputs
        _BUNDLE["dir"] = out
    return _BUNDLE["dir"]


@pytest.fixture(scope="session")
def device_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle(tmp_path_factory)


@pytest.fixture
def copy(device_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(device_bundle, out)
    return out


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _save(d: Path, manifest: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _rehash(d: Path, name: str) -> None:
    """Re-write an artifact's size and sha256 in the manifest, as someone hiding a change would."""
    m = _manifest(d)
    a = next(a for a in m["artifacts"] if a["name"] == name)
    a["bytes"], a["sha256"] = (d / a["file"]).stat().st_size, golden.sha256_file(d / a["file"])
    _save(d, m)


def _int8_onnx(d: Path) -> dict:
    return next(a for a in _manifest(d)["artifacts"] if a["format"] == "onnx" and a["precision"] == "int8")


def run_device(*args: str) -> subprocess.CompletedProcess:
    """`python -m edgeq.device ARGS` in the device venv (no torch there)."""
    assert _BUNDLE.get("python"), "the device_venv fixture makes the device venv first"
    return subprocess.run([str(_BUNDLE["python"]), "-m", "edgeq.device", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.fixture(scope="session", autouse=True)
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return device_python(tmp_path_factory)


# --- golden files ----------------------------------------------------------------------------------------


def test_tensorproto_bytes_are_onnx_numpy_helpers_and_read_back():
    from onnx import TensorProto, helper, numpy_helper

    for a in (np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32), np.arange(-3, 3, dtype=np.int64),
              np.zeros((0, 4), np.float32), np.array([[1, 2]], np.uint8)):
        ours = golden.tensor_bytes(a, "logits")
        assert ours == numpy_helper.from_array(a, "logits").SerializeToString()
        name, back = golden.parse_tensor(ours)
        assert name == "logits" and back.dtype == a.dtype and np.array_equal(back, a)
    typed = helper.make_tensor("t", TensorProto.FLOAT, [2, 2], [1.5, -2, 3, 4]).SerializeToString()
    assert np.array_equal(golden.parse_tensor(typed)[1], np.array([[1.5, -2], [3, 4]], np.float32))
    with pytest.raises(golden.GoldenError):
        golden.parse_tensor(golden.tensor_bytes(np.zeros(4, np.float32), "x")[:-3])


def test_write_returns_a_manifest_entry_that_read_checks(tmp_path: Path):
    x = np.random.default_rng(1).normal(size=(8, 1, 4, 4)).astype(np.float32)
    outs = {"m-fp32-onnx": np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)}
    entry = golden.write(tmp_path, x, outs)
    assert entry["input"]["file"] == "golden/input_0.pb" and entry["samples"] == 8
    assert entry["outputs"]["m-fp32-onnx"]["file"] == "golden/m-fp32-onnx/output_0.pb"
    assert entry["input"]["sha256"] == hashlib.sha256((tmp_path / "golden/input_0.pb").read_bytes()).hexdigest()
    assert set(entry["tolerances"]) == {"fp32", "int8"} and "measured" in entry["tolerances_from"]
    json.dumps(entry)  # the manifest stores it as is
    xi, got = golden.read(tmp_path, entry)
    assert np.array_equal(xi, x) and np.array_equal(got["m-fp32-onnx"], outs["m-fp32-onnx"])
    (tmp_path / "golden/m-fp32-onnx/output_0.pb").write_bytes(golden.tensor_bytes(outs["m-fp32-onnx"] + 1, "logits"))
    with pytest.raises(golden.GoldenError, match="golden/m-fp32-onnx/output_0.pb: sha256 differs"):
        golden.read(tmp_path, entry)
    with pytest.raises(golden.GoldenError, match="name"):
        golden.write(tmp_path, x, {"../evil": outs["m-fp32-onnx"]})


def test_compare_counts_a_flip_only_outside_the_logit_tolerance():
    tol = golden.Tolerance(max_logit_error=1e-3, min_top1_agreement=1.0)
    ref = np.array([[1.0, 0.9999995, 0.0], [0.0, 1.0, 0.2]], np.float32)  # a near-tie, and a clear case
    near = ref.copy()
    near[0, 1] += 1e-6  # the tie swaps within the tolerance: agreement on decided samples stays 1
    r = golden.compare(ref, near, tol)
    assert r["ok"] and r["top1_agreement"] == 1.0 and r["top1_agreement_all"] == 0.5 and r["samples_decided"] == 1
    far = ref.copy()
    far[1] = [0.0, 0.2, 1.0]
    assert not golden.compare(ref, far, tol)["ok"]


# --- the checker -----------------------------------------------------------------------------------------


def test_a_signed_int8_onnx_file_ships_with_onnxruntimes_exact_kernels_for_x86_and_its_golden_outputs(
        device_bundle: Path):
    """An S8S8 file (the arm64 format) runs on x86 through onnxruntime's U8S8 kernels, whose pair sums saturate
    on a CPU without VNNI: its session options ask for the exact kernels there (a no-op on VNNI and ARM), so its
    golden outputs, accuracy and checks are what its QDQ graph means, run unfused, on any build machine."""
    from edgeq import runtime

    manifest = json.loads((device_bundle / "manifest.json").read_text())
    int8 = [a for a in manifest["artifacts"] if a["format"] == "onnx" and a["precision"] == "int8"]
    signed = [a for a in int8 if a["quantization"]["activations"] == "int8"]
    assert signed and len(signed) < len(int8)
    for a in int8:
        options = a["runtime"]["session_options"]
        assert options == (runtime.SIGNED_INT8_SESSION if a in signed else {}), a["name"]
        inputs, outputs = golden.read(device_bundle, manifest["golden"], a["name"])
        unfused = runtime.load(device_bundle / a["file"], "onnx", options={"graph_optimization_level": "ORT_ENABLE_BASIC"})
        expected = unfused.predict(inputs.copy())
        scale = np.abs(expected).max()
        assert np.abs(outputs[a["name"]] - expected).max() <= 1e-5 * scale, a["name"]


def test_the_device_venv_has_no_torch(device_venv: Path):
    for module in ("torch", "click", "matplotlib", "jsonschema", "model_signing"):
        p = subprocess.run([str(device_venv), "-c", f"import {module}"], capture_output=True, text=True)
        assert p.returncode == 1 and "ModuleNotFoundError" in p.stderr, module
    p = subprocess.run([str(device_venv), "-c", "import numpy, onnxruntime, edgeq.device.check; print(edgeq.__file__)"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith(str(ROOT)), p.stderr


def test_check_passes_where_torch_cannot_be_imported(device_bundle: Path, tmp_path: Path):
    report = tmp_path / "report.json"
    p = run_device("check", str(device_bundle), "--accuracy", "--json", str(report))
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(report.read_text())
    assert r["passed"] and r["runtime"]["onnxruntime"] and r["cpu"]["machine"] and "flags" in r["cpu"]
    by_format = {}
    for f in r["files"]:
        by_format.setdefault(f["format"], []).append(f)
    assert all(f["status"] == "ok" and f["fidelity"]["ok"] and f["accuracy"] for f in by_format["onnx"])
    assert all(f["status"] == "not_checked" and "needs torch" in f["note"] for f in by_format["torchscript"])
    # ExecuTorch's runtime needs torch: its programs are listed, with the install command
    assert all(f["status"] == "not_checked" and "pip install" in f["note"] for f in by_format.get("pte", []))
    int8 = [f for f in by_format["onnx"] if f["precision"] == "int8"]
    assert int8 and all(f["speed"]["batches"]["1"]["ratio"] > 0 and f["speed"]["vs"] for f in int8)


def _programs(d: Path) -> dict[str, dict]:
    """The bundle's ExecuTorch programs by precision (the export builds them where ExecuTorch is installed)."""
    from edgeq import pte

    if pte.available(runtime_only=True) is not None:
        pytest.skip(pte.available(runtime_only=True))
    programs = {a["precision"]: a for a in _manifest(d)["artifacts"] if a["format"] == "pte" and a["model"] == "x86"}
    assert set(programs) == {"fp32", "int8"}, _manifest(d)["skipped"]
    return programs


def test_check_runs_torchscript_and_executorch_programs_where_torch_is_there(device_bundle: Path):
    from edgeq.device.check import CheckConfig, check

    r = check(device_bundle, CheckConfig(rounds=2, accuracy=True))
    assert r.passed, r.failure_lines()
    ts = [f for f in r.files if f.format == "torchscript"]
    assert ts and all(f.status == "ok" and f.fidelity["bit_equal"] for f in ts)
    assert all(f.status == "not_checked" for f in r.files if f.format == "checkpoint")
    programs = _programs(device_bundle)  # skips here where ExecuTorch is not installed
    assert r.runtime["executorch"]
    manifest = {a["name"]: a for a in _manifest(device_bundle)["artifacts"]}
    files = [f for f in r.files if f.format == "pte"]
    assert {f.name for f in files} == {a["name"] for a in manifest.values() if a["format"] == "pte"}
    for f in files:  # run on the golden inputs within the tolerance, and over eval.npz
        assert f.status == "ok" and f.fidelity["ok"] and f.fidelity["samples_decided"] > 0, f
        assert f.accuracy["accuracy"] == manifest[f.name]["accuracy"] and f.accuracy["same_samples_as_manifest"]
    timed = next(f for f in files if f.name == programs["int8"]["name"])
    assert timed.speed["vs"] == programs["fp32"]["name"] and timed.speed["batches"]["1"]["ratio"] > 0


def test_changed_executorch_programs_and_golden_outputs_fail_naming_the_file(copy: Path):
    from edgeq.device.check import CheckConfig, check

    programs = _programs(copy)
    fp32, int8 = programs["fp32"], programs["int8"]
    # the fp32 program replaced by another valid program (the int8 one), its size and sha256 re-written
    shutil.copyfile(copy / int8["file"], copy / fp32["file"])
    _rehash(copy, fp32["name"])
    # the int8 program's golden outputs edited, their sha256 re-written
    path = copy / "golden" / int8["name"] / "output_0.pb"
    path.write_bytes(golden.tensor_bytes(golden.read_tensor(path) + 0.5, "logits"))
    m = _manifest(copy)
    m["golden"]["outputs"][int8["name"]].update(sha256=golden.sha256_file(path), bytes=path.stat().st_size)
    _save(copy, m)
    r = check(copy, CheckConfig(rounds=0))
    assert not r.passed
    fails = r.failure_lines()
    assert len(fails) == 2, fails
    for a in (fp32, int8):
        assert any(line.startswith(f"FAIL {a['file']} ({a['name']}): differs from its golden outputs: logit error")
                   for line in fails), fails
    assert all(f.status == "ok" for f in r.files if f.name not in (fp32["name"], int8["name"]) and f.format != "checkpoint")


def test_changed_onnx_weights_with_a_rewritten_sha256_fail_naming_the_file(copy: Path):
    import onnx
    from onnx import numpy_helper

    art = _int8_onnx(copy)
    model = onnx.load(str(copy / art["file"]))
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    w = numpy_helper.to_array(weights[0])
    weights[0].CopyFrom(numpy_helper.from_array((-w.astype(np.int16)).clip(-127, 127).astype(np.int8), weights[0].name))
    onnx.save(model, str(copy / art["file"]))
    _rehash(copy, art["name"])
    p = run_device("check", str(copy), "--rounds", "0")
    assert p.returncode == 1
    fails = [line for line in p.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith(f"FAIL {art['file']} ({art['name']}): differs from its golden outputs")
    assert "Traceback" not in p.stderr


def test_edited_golden_outputs_fail_naming_the_file(copy: Path):
    art = _int8_onnx(copy)
    path = copy / "golden" / art["name"] / "output_0.pb"
    out = golden.read_tensor(path)
    path.write_bytes(golden.tensor_bytes(out + 0.5, "logits"))
    p = run_device("check", str(copy), "--rounds", "0")
    assert p.returncode == 1
    assert [line for line in p.stdout.splitlines() if line.startswith("FAIL")] == [
        f"FAIL {art['file']} ({art['name']}): golden outputs: golden/{art['name']}/output_0.pb: sha256 differs from "
        "the manifest's"]
    # the same edit with its hash re-written in the manifest: the outputs no longer match
    m = _manifest(copy)
    m["golden"]["outputs"][art["name"]]["sha256"] = golden.sha256_file(path)
    _save(copy, m)
    p = run_device("check", str(copy), "--rounds", "0")
    assert p.returncode == 1 and f"FAIL {art['file']} ({art['name']}): differs from its golden outputs" in p.stdout


def test_each_bad_file_fails_on_its_own_line_and_the_others_are_still_checked(copy: Path, tmp_path: Path):
    m = _manifest(copy)
    onnx_arts = [a for a in m["artifacts"] if a["format"] == "onnx"]
    fp32 = next(a for a in onnx_arts if a["precision"] == "fp32")
    int8 = next(a for a in onnx_arts if a["precision"] == "int8" and a["model"] == fp32["model"])
    (copy / "golden" / fp32["name"] / "output_0.pb").unlink()  # a missing golden file
    (copy / int8["file"]).write_bytes(b"not an onnx model")  # unloadable, its hash re-written
    _rehash(copy, int8["name"])
    report = tmp_path / "r.json"
    p = run_device("check", str(copy), "--rounds", "0", "--json", str(report))
    assert p.returncode == 1
    fails = [line for line in p.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2
    assert f"FAIL {fp32['file']} ({fp32['name']}): golden outputs: golden/{fp32['name']}/output_0.pb: missing" in fails[0] \
        or f"FAIL {fp32['file']} ({fp32['name']}): golden outputs: golden/{fp32['name']}/output_0.pb: missing" in fails[1]
    assert any(f.startswith(f"FAIL {int8['file']} ({int8['name']}): onnxruntime cannot load it (") for f in fails)
    r = json.loads(report.read_text())
    others = [f for f in r["files"] if f["format"] == "onnx" and f["name"] not in (fp32["name"], int8["name"])]
    assert all(f["status"] == "ok" for f in others)  # checked, not skipped
    assert not r["passed"]


def test_an_output_shape_other_than_the_manifests_fails(copy: Path):
    m = _manifest(copy)
    model = m["artifacts"][0]["model"]
    m["models"][model]["classes"].append("extra")
    _save(copy, m)
    p = run_device("check", str(copy), "--rounds", "0")
    assert p.returncode == 1
    onnx_files = [a["file"] for a in m["artifacts"] if a["format"] == "onnx" and a["model"] == model]
    for f in onnx_files:
        assert any(line.startswith(f"FAIL {f} ") and "output shape [64, 10], the manifest's is [64, 11]" in line
                   for line in p.stdout.splitlines())


def test_changed_file_fails_by_hash_and_the_signature_is_checked_without_model_signing(copy: Path, tmp_path: Path):
    from edgeq import signing

    key, pub = tmp_path / "key.pem", tmp_path / "pub.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True)
    subprocess.run(["openssl", "ec", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    signing.sign_directory(copy, key)
    p = run_device("check", str(copy), "--rounds", "0", "--public-key", str(pub), "--json", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((tmp_path / "r.json").read_text())["signature"]["status"] == "verified"
    art = _int8_onnx(copy)
    with open(copy / art["file"], "ab") as f:
        f.write(b"\0")
    p = run_device("check", str(copy), "--rounds", "0", "--public-key", str(pub))
    assert p.returncode == 1
    assert f"FAIL edgeq.sig: {art['file']}: changed since signing" in p.stdout
    assert f"FAIL {art['file']} ({art['name']})" not in p.stdout  # after a failed signature nothing else is read


def test_no_manifest_is_one_line_and_exit_1(tmp_path: Path):
    p = run_device("check", str(tmp_path))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"edgeq: error: {tmp_path}/manifest.json: no manifest; copy the whole export folder " \
                               "(manifest.json included)"


# --- the device plan -------------------------------------------------------------------------------------


def _only_this_target(d: Path) -> str:
    """Keep in the bundle only the family built for this machine's target (plan.json re-hashed)."""
    m, plan = _manifest(d), json.loads((d / "plan.json").read_text())
    here = next(iter(plan["models"])) if len(plan["models"]) == 1 else "x86"
    plan["models"] = {here: plan["models"][here]}
    (d / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    m["artifacts"] = [a for a in m["artifacts"] if a["model"] == here]
    m["plan"].update(bytes=(d / "plan.json").stat().st_size, sha256=golden.sha256_file(d / "plan.json"))
    _save(d, m)
    return here


def test_device_plan_refuses_a_bundle_built_for_another_target(copy: Path, tmp_path: Path):
    if len(json.loads((copy / "plan.json").read_text())["models"]) < 2:
        pytest.skip("the recipe has no targets yet: no arm64 files to refuse")
    p = run_device("plan", str(copy), "--out", str(tmp_path / "plan.json"))
    assert p.returncode == 1 and not (tmp_path / "plan.json").exists()
    assert p.stderr.strip().splitlines()[-1] == ("edgeq: error: arm64 was built for target arm64; this device is x86 (x86_64): "
                                                 "timings here say nothing about arm64; plan on the target, or "
                                                 "re-export with --target x86")


def test_device_plan_round_trip(copy: Path, tmp_path: Path):
    """Plan on the device at 2 threads (no torch), rebuild from that plan, check the rebuilt bundle."""
    import dataclasses

    import edgeq

    family = _only_this_target(copy)
    out = tmp_path / "device-plan.json"
    p = run_device("plan", str(copy), "--threads", "2", "--budget", "0.5", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    # timed and quantized in a confined child, its files in its scratch folder (docs/security.md)
    assert "sandbox: the files were timed in a child process confined by Landlock" in p.stderr or \
        "sandbox: no Landlock" in p.stderr, p.stderr[-2000:]
    plan = json.loads(out.read_text())
    assert plan["measured_on"]["by"] == "python -m edgeq.device plan" and plan["measured_on"]["threads"] == 2
    fam = plan["models"][family]
    assert fam["recipe"]["threads"] == 2
    for rec in fam["precision"].values():
        assert rec["cost"]["timed_on"].startswith("the device: ") and "2 threads" in rec["cost"]["timed_on"]
        assert rec["cost"]["inputs"] == "val.npz (val split)"
    m, x, y = _BUNDLE["model"]
    recipe = dataclasses.replace(_BUNDLE["recipes"][family], threads=2)
    rebuilt = tmp_path / "rebuilt"
    edgeq.compress({family: m}, train=(x[:500], y[:500]), test=(x[500:], y[500:]), out=rebuilt,
                   recipe={family: recipe}, plan=out, progress=False, log=lambda _: None)
    replayed = json.loads((rebuilt / "plan.json").read_text())["models"][family]["precision"]
    assert {k: v["qdq"] for k, v in replayed.items()} == {k: v["qdq"] for k, v in fam["precision"].items()}
    assert _manifest(rebuilt)["plan"]["replayed"] is True
    p = run_device("check", str(rebuilt), "--rounds", "0")
    assert p.returncode == 0, p.stdout


def test_help_shows_an_example_for_each_command():
    for command in ("check", "plan"):
        p = run_device(command, "--help")
        assert p.returncode == 0 and f"python -m edgeq.device {command} " in p.stdout.split("example:")[1]
