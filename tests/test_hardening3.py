"""Hardening, third round, the read side: `edgeq verify` and `python -m edgeq.device check` read a bundle by
one set of rules (edgeq.bundle) from a private copy, parse golden files with bounds, and refuse hostile
values in one line. Each test reproduces one attack with real files and processes (the swapping, killing
and signalling are real processes too) and asserts the promised outcome.

The tiny 8-input MLP export of test_hardening2 keeps most runs to seconds; the device checker runs in the
device venv of test_device (numpy, onnxruntime, onnx: no torch), as on a device, except where a test needs
torch. No test reads a timing outcome of its own run: work is bounded by counts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgeq import bundle, golden, policy
from edgeq.manifest import sha256_file
from edgeq.signing import sign_directory
from edgeq.verify import verify
from edgeq.verify.command import verify as verify_command
from test_device import device_python, venv_with
from test_hardening2 import (ALLOWED, FAST, LIMIT_GB, ROOT, _padded, cli, copy, env, export_args, keys,  # noqa: F401
                             mounted, one_line_error, rehash, swapping, tiny, tree_peak_rss, user, wait_for,
                             write_npz_bomb)


# helpers ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device_py(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_device's venv: numpy, onnxruntime, onnx, sympy, cryptography; no torch, click or jsonschema."""
    return device_python(tmp_path_factory)


def device(*args: object, python: Path | str = sys.executable, tmpdir: Path | None = None,
           timeout: float = 300) -> SimpleNamespace:
    """`python -m edgeq.device ARGS` as a process; exit_code and output (stdout, then stderr) as
    one_line_error reads them."""
    extra = {"TMPDIR": str(tmpdir)} if tmpdir else {}
    p = subprocess.run([str(python), "-m", "edgeq.device", *map(str, args)], capture_output=True, text=True,
                       env={**env(), **extra}, cwd=ROOT, timeout=timeout)
    return SimpleNamespace(exit_code=p.returncode, output=p.stdout + p.stderr, stdout=p.stdout, stderr=p.stderr)


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def save(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def rehash_entry(d: Path, entry: dict) -> None:
    """A listed file's size and sha256 re-written in its manifest entry, as anyone who can write DIR can."""
    entry.update(bytes=(d / entry["file"]).stat().st_size, sha256=sha256_file(d / entry["file"]))


def no_traceback(r: SimpleNamespace) -> None:
    assert "Traceback" not in r.output and r.exit_code in (0, 1), r.output[-3000:]


def snapshot_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny8(user: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with static and dynamic int8 files too (read-only: copy it before changing anything)."""
    out = tmp_path_factory.mktemp("tiny8") / "art"
    recipe = out.parent / "recipe.toml"
    recipe.write_text('ship_rule = "always"\nsearch_budget_s = 0.01\n')  # every int8 file ships, whatever its speed
    r = cli(*export_args(user, out), "--variants", "static,dynamic", "--no-executorch", "--recipe", recipe)
    assert r.exit_code == 0, r.output
    return out


# 1. nothing outside DIR is ever deleted, whatever a manifest names ----------------------------------------------


def _golden_outside(art: Path, victim: Path, how: str) -> None:
    """Point the golden inputs outside `art`, at byte-identical files in `victim` (so every hash matches)."""
    victim.mkdir()
    m = manifest(art)
    if how == "symlinked-folder":
        shutil.move(art / "golden", victim / "golden")
        os.symlink(victim / "golden", art / "golden")
        return
    shutil.copy(art / "golden" / "input_0.pb", victim / "input_0.pb")
    m["golden"]["input"]["file"] = str(victim / "input_0.pb") if how == "absolute" else "../victim/input_0.pb"
    save(art, m)


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlinked-folder"])
def test_a_golden_path_outside_dir_deletes_nothing_in_verify_or_the_device_checker(
        tiny: Path, tmp_path: Path, how: str, verify_worker, device_py: Path) -> None:
    art, victim = copy(tiny, tmp_path / "art"), tmp_path / "victim"
    _golden_outside(art, victim, how)
    before = snapshot_of(victim)
    assert before
    result = verify(art, FAST, verify_worker)
    assert not result.passed
    needle = {"absolute": "absolute path", "dotdot": "path leaves the directory", "symlinked-folder": "golden"}[how]
    assert any(needle in line for line in result.failures), result.failures
    r = device("check", art, "--rounds", "0", python=device_py)
    no_traceback(r)
    assert r.exit_code == 1 and any(needle in line for line in r.stdout.splitlines() if line.startswith("FAIL")), \
        r.output
    assert snapshot_of(victim) == before  # every victim file survives, byte for byte


def test_the_private_copy_never_follows_a_folder_swapped_for_a_link(tiny: Path, tmp_path: Path) -> None:
    """The copy walks DIR with file descriptors: a folder named by the manifest but swapped for a symlink is
    recreated as the symlink, never entered, and nothing outside the copy is written or removed."""
    art, victim = copy(tiny, tmp_path / "art"), tmp_path / "victim"
    _golden_outside(art, victim, "symlinked-folder")
    before = snapshot_of(victim)
    root = tmp_path / "copy"
    root.mkdir()
    names = bundle.listed(["golden/input_0.pb", "/etc/passwd", "../victim/input_0.pb", "manifest.json"])
    assert names == {"golden/input_0.pb", "manifest.json"}
    snap = bundle.snapshot(art, root, lambda rel: rel in names)
    assert (root / "golden").is_symlink() and not snap.unreadable
    assert bundle.path_problem(root, "golden/input_0.pb").startswith("golden is a symlink")
    assert snapshot_of(victim) == before


# 2. the device checker's signature covers exactly the bytes it runs ---------------------------------------------


def test_the_device_checker_never_runs_a_file_swapped_after_its_signature_was_checked(
        tiny: Path, keys: dict[str, Path], tmp_path: Path, device_py: Path) -> None:
    signed = copy(tiny, tmp_path / "art")
    sign_directory(signed, keys["key"])
    name = "user-fp32.onnx"
    signed_sha, signed_bytes = sha256_file(signed / name), (signed / name).stat().st_size
    tampered = copy(signed, tmp_path / "stage" / "tampered")
    _padded(signed / name, tampered / name)  # answers as the signed file does, but is not it
    rehash(tampered, name)
    outcomes = []
    with swapping(signed, tmp_path / "stage", [name, "manifest.json"]):
        for i in range(3):
            report = tmp_path / f"r{i}.json"
            r = device("check", signed, "--rounds", "0", "--public-key", keys["pub"], "--json", report,
                       python=device_py)
            no_traceback(r)
            found = json.loads(report.read_text())
            if not found["passed"]:
                assert found["signature"]["status"] == "failed" and len(found["bundle_problems"]) == 1, found
                assert found["files"] == []  # after a failed signature nothing the manifest names is read
                outcomes.append("refused")
                continue
            assert found["signature"]["status"] == "verified"
            ran = next(f for f in found["files"] if f["file"] == name)
            assert (ran["sha256"], ran["bytes"]) == (signed_sha, signed_bytes), "ran bytes other than the signed ones"
            outcomes.append("passed")
    assert len(outcomes) == 3


# 3, 8. golden files and .npz arrays are parsed with bounds; hostile ones are one line ----------------------------


def _tensor(dims: list[int], code: int = 1, raw: bytes | None = None, packed: tuple[int, bytes] | None = None) -> bytes:
    """A TensorProto by hand: dims, data_type, name, then raw_data or one packed field (number, bytes)."""
    out = b"".join(golden._key(1, 0) + golden._varint(d) for d in dims) + golden._key(2, 0) + golden._varint(code)
    out += golden._key(8, 2) + golden._varint(5) + b"input"
    if raw is not None:
        out += golden._key(9, 2) + golden._varint(len(raw)) + raw
    if packed is not None:
        out += golden._key(packed[0], 2) + golden._varint(len(packed[1])) + packed[1]
    return out


HOSTILE = {
    "dims 2**62 x 4": (_tensor([2**62, 4], raw=b""), "declares"),
    "dims -1 x -1": (_tensor([-1, -1], raw=b""), "negative dimension"),
    "5-byte packed float": (_tensor([2], packed=(4, b"abcde")), "5 bytes of float_data"),
    "packed varints": (_tensor([48, 8], code=7, packed=(7, b"\x01" * 4_000_000)), "more varint bytes"),
    "truncated": (golden.tensor_bytes(np.zeros((48, 8), np.float32), "input")[:-7], "truncated field"),
}


def test_hostile_tensorprotos_never_become_python_ints_or_tracebacks() -> None:
    for data, needle in HOSTILE.values():
        with pytest.raises(golden.GoldenError, match=needle):
            golden.parse_tensor(data)
    values = np.arange(-1000, 2_000_000, dtype=np.int64)  # 2M packed varints: decoded by numpy, not one by one
    from onnx import TensorProto, helper

    back = golden.parse_tensor(helper.make_tensor("t", TensorProto.INT64, [len(values)], values).SerializeToString())[1]
    assert back.dtype == np.int64 and np.array_equal(back, values)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_golden_input_is_one_line_in_verify_and_the_device_checker(
        tiny: Path, tmp_path: Path, case: str, verify_worker, device_py: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    data, needle = HOSTILE[case]
    (art / "golden" / "input_0.pb").write_bytes(data)
    m = manifest(art)
    rehash_entry(art, m["golden"]["input"])
    save(art, m)
    result = verify(art, FAST, verify_worker)  # one FAIL line per row, never a traceback after the run
    assert not result.passed and all("golden/input_0.pb: not a TensorProto" in line and needle in line
                                     for line in result.failures), result.failures
    r = device("check", art, "--rounds", "0", python=device_py)
    no_traceback(r)
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert r.exit_code == 1 and fails and all(needle in line for line in fails), r.output


def test_a_hostile_golden_output_fails_only_its_own_file(tiny: Path, tmp_path: Path, verify_worker,
                                                         device_py: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    m = manifest(art)
    item = m["golden"]["outputs"]["user-fp32-onnx"]
    (art / item["file"]).write_bytes(HOSTILE["5-byte packed float"][0])
    rehash_entry(art, item)
    save(art, m)
    result = verify(art, FAST, verify_worker)
    assert [r.name for r in result.rows if r.status == "FAIL"] == ["user-fp32-onnx"], result.failures
    r = device("check", art, "--rounds", "0", python=device_py)
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith("FAIL user-fp32.onnx (user-fp32-onnx): golden outputs: "), r.output


def test_a_sparse_golden_file_costs_verify_and_the_device_checker_no_memory(tiny: Path, tmp_path: Path,
                                                                            device_py: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    path = art / "golden" / "input_0.pb"
    with open(path, "r+b") as f:
        f.truncate(512 << 20)  # 512 MiB, almost all a hole: read whole, it would break the bound
    m = manifest(art)
    rehash_entry(art, m["golden"]["input"])
    save(art, m)
    r, peak = tree_peak_rss([sys.executable, "-m", "edgeq", "verify", str(art), "--quiet", "--batch", "32",
                             "--rounds", "1", "--memory-limit", str(LIMIT_GB)], timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "golden/input_0.pb: 512.0 MiB, over the 128.0 MiB a golden tensor may take here" in r.stderr, r.stderr
    assert peak < ALLOWED, f"verify and its worker peaked at {peak / 2**20:.0f} MiB: {r.at_peak}"
    r, peak = tree_peak_rss([str(device_py), "-m", "edgeq.device", "check", str(art), "--rounds", "0",
                             "--memory-limit", str(LIMIT_GB)], timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "over the 128.0 MiB" in r.stdout, r.stdout
    assert peak < ALLOWED, f"the device checker peaked at {peak / 2**20:.0f} MiB: {r.at_peak}"


def _npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("case", ["no inputs", "object arrays", "short labels", "bomb"])
def test_a_hostile_eval_npz_is_one_line_in_the_device_checker_and_never_loaded_whole(
        tiny: Path, tmp_path: Path, case: str, device_py: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    x, y = np.zeros((48, 8), np.float32), np.zeros(48, np.int64)
    match case:
        case "no inputs":
            _npz(art / "eval.npz", labels=y)
        case "object arrays":
            _npz(art / "eval.npz", inputs=np.array([object()] * 48), labels=y)
        case "short labels":
            _npz(art / "eval.npz", inputs=x, labels=y[:40])
        case "bomb":
            write_npz_bomb(art / "eval.npz", (32_768, 8, 256), 32_768)  # 0.3 MB on disk, 256 MiB loaded
    rehash(art, "eval.npz")
    r, peak = tree_peak_rss([str(device_py), "-m", "edgeq.device", "check", str(art), "--accuracy", "--rounds", "0",
                             "--memory-limit", str(LIMIT_GB)])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    needle = {"no inputs": "has no array 'inputs'", "object arrays": "Python objects",
              "short labels": "do not fit", "bomb": "declare 0.25 GiB once loaded"}[case]
    assert any(line.startswith("FAIL --accuracy: eval.npz: ") and needle in line for line in r.stdout.splitlines()), \
        r.stdout
    assert peak < ALLOWED, f"the device checker peaked at {peak / 2**20:.0f} MiB: {r.at_peak}"


# 3, 6. bounded options and manifest values ----------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["--rounds", "-5"], "--rounds: -5 is outside 0 to 1000"),
    (["--rounds", "1e9"], "--rounds: '1e9' is not a whole number"),
    (["--batch", "-3"], "--batch: -3 is outside 1 to 4096"),
    (["--batch", "100000000"], "--batch: 100000000 is outside 1 to 4096"),
    (["--threads", "100000"], "--threads: 100000 is outside 1 to"),
    (["--memory-limit", "0"], "--memory-limit: '0' is not a number of GiB > 0"),
    (["--memory-limit", "nan"], "--memory-limit: 'nan' is not a number of GiB > 0"),
    (["--optimization", "fast"], "--optimization: invalid choice"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_hostile_device_options_are_one_line(tiny: Path, args: list[str], needle: str, device_py: Path) -> None:
    one_line_error(device("check", tiny, *args, python=device_py), needle)


def test_a_manifest_asking_for_100000_threads_is_capped_with_a_note(tiny8: Path, tmp_path: Path,
                                                                    device_py: Path) -> None:
    art = copy(tiny8, tmp_path / "art")
    m = manifest(art)
    m["models"]["user"]["recipe"]["threads"] = 100_000
    save(art, m)
    r = device("check", art, "--rounds", "2", "--json", tmp_path / "r.json", python=device_py)
    no_traceback(r)
    assert r.exit_code == 0 and "note: the recipe's 100000 threads capped at this device's" in r.stdout, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["threads"].values()) == {len(os.sched_getaffinity(0))}


def test_the_device_memory_limit_caps_what_a_file_may_allocate(tiny: Path, tmp_path: Path, device_py: Path) -> None:
    """An ONNX file whose graph asks for 1 GiB: under --memory-limit 0.25 it fails its own row in one line."""
    import onnx
    from onnx import helper, numpy_helper

    art = copy(tiny, tmp_path / "art")
    model = onnx.load(str(art / "user-fp32.onnx"))
    out = model.graph.output[0].name
    hidden = out + "_base"
    for node in model.graph.node:
        node.output[:] = [hidden if o == out else o for o in node.output]
    model.graph.initializer.extend([numpy_helper.from_array(np.array([1 << 28], np.int64), "huge_shape"),
                                    numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model.graph.node.extend([  # zero * sum(1 GiB of the inputs' sum) + logits: a new 1 GiB buffer every call
        helper.make_node("ReduceSum", [model.graph.input[0].name], ["scalar"], keepdims=0),
        helper.make_node("Expand", ["scalar", "huge_shape"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Add", [hidden, "nothing"], [out])])
    del model.graph.value_info[:]
    onnx.save(model, str(art / "user-fp32.onnx"))
    rehash(art, "user-fp32.onnx")
    r = device("check", art, "--rounds", "0", "--memory-limit", "0.25", python=device_py)
    no_traceback(r)
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert r.exit_code == 1 and len(fails) == 1 and fails[0].startswith("FAIL user-fp32.onnx (user-fp32-onnx): "), \
        r.output
    assert device("check", art, "--rounds", "0", "--memory-limit", "4", python=device_py).exit_code == 0  # the control


# 7. verify's memory limit, one file at a time: tests/test_mnist_example.py, on the example's export in every format


# 8. the device checker: one rule book with verify ---------------------------------------------------------------


def _claim(art: Path, name: str, off_by: int, other_machine: bool) -> None:
    """The manifest's accuracy claim of `name` moved by `off_by` samples of eval.npz; optionally built elsewhere."""
    m = manifest(art)
    a = next(a for a in m["artifacts"] if a["name"] == name)
    n = m["dataset"]["test_size"]
    a["accuracy"] = (round(a["accuracy"] * n) + off_by) / n
    if other_machine:
        m["environment"]["cpu"]["model"] = "another CPU"
    save(art, m)


def test_the_device_checker_allows_verifys_claim_slack_on_another_machine_only(
        tiny8: Path, tmp_path: Path, device_py: Path) -> None:
    n = manifest(tiny8)["dataset"]["test_size"]
    assert policy.claim_slack(n, same=False) == 1 and policy.claim_slack(n, same=True) == 0
    for off_by, other, passes in ((1, True, True), (2, True, False), (1, False, False)):
        art = copy(tiny8, tmp_path / f"art-{off_by}-{other}")
        _claim(art, "user-fp32-onnx", off_by, other)
        # torch-free where the machine differs (as on a device); the export's own runtimes where it does not
        r = device("check", art, "--accuracy", "--rounds", "0", python=device_py if other else sys.executable)
        no_traceback(r)
        assert (r.exit_code == 0) == passes, (off_by, other, r.output)
        if not passes:
            assert "FAIL user-fp32.onnx (user-fp32-onnx): accuracy " in r.stdout and "the manifest says" in r.stdout


def test_check_accuracy_passes_dynamic_int8_torchscript_where_torch_is(tiny8: Path, tmp_path: Path) -> None:
    """Dynamic int8 quantizes each call's batch: the checker runs eval.npz in the exporter's calls, so its
    counts are the manifest's to the sample on the export's machine."""
    report = tmp_path / "r.json"
    r = device("check", tiny8, "--accuracy", "--rounds", "0", "--json", report)
    assert r.exit_code == 0, r.output
    files = {f["name"]: f for f in json.loads(report.read_text())["files"]}
    dynamic = files["user-dynamic-ts"]
    assert dynamic["status"] == "ok" and dynamic["accuracy"]["same_samples_as_manifest"]


def test_relabelled_formats_never_pass_with_nothing_checked(tiny: Path, tmp_path: Path, device_py: Path) -> None:
    for label in ("checkpoint", "bogus"):
        art = copy(tiny, tmp_path / label)
        m = manifest(art)
        for a in m["artifacts"]:
            a["format"] = label
        save(art, m)
        r = device("check", art, "--rounds", "0", python=device_py)
        no_traceback(r)
        assert r.exit_code == 1 and "passed" not in r.stdout.splitlines()[-1], r.output
        needle = "not a checkpoint file (not a zip archive" if label == "checkpoint" else "format 'bogus'"
        assert f"FAIL user-fp32.onnx (user-fp32-onnx): {needle}" in r.stdout, r.output


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda m: m.update(models=[]), "models is not an object"),
    (lambda m: m.update(artifacts={}), "artifacts is not a non-empty list"),
    (lambda m: m["artifacts"].__setitem__(0, ["user"]), "artifacts/0 is not an object"),
    (lambda m: m["artifacts"][0].update(bytes="12"), "artifacts/0/bytes is not a whole number"),
    (lambda m: m.update(golden=[]), "golden is not an object"),
    (lambda m: m["golden"].update(outputs=[]), "golden/outputs is not an object"),
    (lambda m: m["dataset"].update(eval=["eval.npz"]), "dataset/eval is not an object"),
    (lambda m: m["models"]["user"].update(recipe=[1]), "models/user/recipe is not an object"),
], ids=["models-list", "artifacts-dict", "artifact-list", "bytes-string", "golden-list", "outputs-list",
        "eval-list", "recipe-list"])
def test_type_confused_manifests_are_one_line(tiny: Path, tmp_path: Path, edit, needle: str, device_py: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    m = manifest(art)
    edit(m)
    save(art, m)
    one_line_error(device("check", art, "--rounds", "0", python=device_py), f"{art}/manifest.json: {needle}")
    one_line_error(CliRunner().invoke(verify_command, [str(art), "--quiet"]), "manifest.json")


def test_a_missing_runtime_prints_the_pip_line(tiny: Path, tiny8: Path, tmp_path: Path) -> None:
    numpy_only = venv_with(tmp_path / "a", ("numpy",))
    one_line_error(device("check", tiny, python=numpy_only), "onnxruntime is not installed here",
                   "pip install onnxruntime")
    no_onnx = venv_with(tmp_path / "b", ("numpy", "onnxruntime"))  # the plan quantizes: its quantizer needs onnx
    r = device("plan", tiny8, "--out", tmp_path / "plan.json", "--budget", "0.5", python=no_onnx)
    one_line_error(r, "is not installed here", "pip install")
    assert "onnx" in r.output.splitlines()[-1] and not (tmp_path / "plan.json").exists()


# 9. reports never overwrite the bundle being checked ------------------------------------------------------------


def test_report_paths_inside_the_bundle_or_that_are_folders_are_refused(tiny: Path, tmp_path: Path,
                                                                        device_py: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    before = snapshot_of(art)
    for path in (art / "manifest.json", art / "golden" / "input_0.pb", art / "new.json"):
        one_line_error(CliRunner().invoke(verify_command, [str(art), "--quiet", "--json", str(path)]),
                       f"--json {path}: inside {art}")
        one_line_error(device("check", art, "--json", path, python=device_py), f"--json {path}: inside {art}")
        one_line_error(device("plan", art, "--out", path, python=device_py), f"--out {path}: inside {art}")
    one_line_error(device("check", art, "--json", tmp_path, python=device_py), f"--json {tmp_path}: is a directory")
    one_line_error(device("plan", art, "--out", tmp_path, python=device_py), f"--out {tmp_path}: is a directory")
    link = tmp_path / "report.json"
    link.symlink_to(art / "manifest.json")  # a path outside that leads inside
    one_line_error(device("check", art, "--json", link, python=device_py), "inside")
    assert snapshot_of(art) == before


def test_a_usage_error_is_one_line_naming_the_option(tiny: Path, tmp_path: Path) -> None:
    """click's own refusals (a folder where a report file goes, a missing argument, an unknown option) are one
    `edgeq: error:` line and exit 1 like edgeq's, not click's usage block, and nothing is written."""
    from edgeq.cli import main

    before = snapshot_of(tiny)
    for option in ("--markdown", "--json", "--plot"):
        one_line_error(CliRunner().invoke(main, ["verify", str(tiny), "--quiet", option, f"{tmp_path}/"]),
                       f"'{option}'", "is a directory", "verify --help`")
    one_line_error(CliRunner().invoke(main, ["verify"]), "Missing argument 'DIR'")
    one_line_error(CliRunner().invoke(main, ["verify", str(tiny), "--repeats", "3"]), "--repeats")
    one_line_error(CliRunner().invoke(main, ["export", "--recipe", str(tmp_path)]), "'--recipe'", "is a directory")
    assert snapshot_of(tiny) == before and not any(tmp_path.iterdir())
    p = subprocess.run([sys.executable, "-m", "edgeq", "verify", "--threads", "0", str(tiny)], capture_output=True,
                       text=True, env=env())
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith("edgeq: error: Invalid value for '--threads'"), p.stderr


def test_a_report_on_a_read_only_file_system_is_one_line_before_any_work(tiny: Path, tmp_path: Path,
                                                                         device_py: Path) -> None:
    with mounted(tmp_path / "ro", "ro,size=1m") as ro:
        one_line_error(device("check", tiny, "--json", ro / "r.json", python=device_py), "read-only")
        one_line_error(CliRunner().invoke(verify_command, [str(tiny), "--quiet", "--json", str(ro / "r.json")]),
                       "read-only")


# 10. signals remove the private copy; a killed run's copy goes with the next run ------------------------------


def _copies(tmpdir: Path, kind: str, pid: int | None = None) -> list[Path]:
    return sorted(tmpdir.glob(f"edgeq-{kind}-{pid if pid is not None else '*'}-*"))


def _start(kind: str, art: Path, tmpdir: Path, python: Path) -> subprocess.Popen:
    cmd = ([str(python), "-m", "edgeq", "verify", str(art), "--quiet"] if kind == "verify" else
           [str(python), "-m", "edgeq.device", "check", str(art), "--rounds", "1000"])
    # SIGINT as a terminal delivers it, whatever this run inherited: a shell starts background jobs with SIGINT
    # ignored, and a child that starts with it ignored rightly keeps ignoring it
    return subprocess.Popen(cmd, env={**env(), "TMPDIR": str(tmpdir)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("kind", ["verify", "device"])
def test_a_signal_removes_the_private_copy(tiny8: Path, tmp_path: Path, kind: str, sig, device_py: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _start(kind, tiny8, tmpdir, sys.executable if kind == "verify" else device_py)
    try:
        wait_for(lambda: _copies(tmpdir, kind, proc.pid) or proc.poll() is not None, 120)
        assert _copies(tmpdir, kind, proc.pid), proc.communicate()
        time.sleep(0.5)  # well inside the run: 1,000 timing rounds
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert _copies(tmpdir, kind) == []


def test_a_sigkilled_runs_copy_is_removed_by_the_next_run(tiny8: Path, tiny: Path, tmp_path: Path,
                                                          device_py: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _start("device", tiny8, tmpdir, device_py)
    try:
        wait_for(lambda: _copies(tmpdir, "device", proc.pid) or proc.poll() is not None, 120)
        time.sleep(0.5)
        proc.kill()  # SIGKILL: no clean-up can run
        proc.wait()
    finally:
        proc.kill()
    left = _copies(tmpdir, "device", proc.pid)
    assert left, "a SIGKILLed run leaves its copy (nothing can remove it then)"
    other = tmpdir / f"edgeq-verify-{os.getpid()}-alive"
    other.mkdir()  # a live process's copy: kept
    r = device("check", tiny, "--rounds", "0", python=device_py, tmpdir=tmpdir)
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in left) and other.is_dir()


# 4. a killed export's previous copy is named ------------------------------------------------------------------


def test_verify_and_the_checker_name_the_copy_a_killed_export_left(tiny: Path, tmp_path: Path,
                                                                   device_py: Path) -> None:
    old = copy(tiny, tmp_path / ".art.old-4194303-abcdefgh")
    out = tmp_path / "art"
    line = one_line_error(CliRunner().invoke(verify_command, [str(out), "--quiet"]), f"{out}: no such directory",
                          str(old), f"mv {old} {out}")
    assert "edgeq export" in line
    one_line_error(device("check", out, python=device_py), f"{out}: no such directory", f"mv {old} {out}")


# 5. symlinks fail -----------------------------------------------------------------------------------------------


def test_a_symlinked_golden_file_fails_unsigned_verify_and_the_device_checker(tiny: Path, tmp_path: Path,
                                                                              verify_worker, device_py: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    real = tmp_path / "elsewhere.pb"
    shutil.move(art / "golden" / "input_0.pb", real)
    os.symlink(real, art / "golden" / "input_0.pb")  # the same bytes, behind a link
    result = verify(art, FAST, verify_worker)
    assert not result.passed
    assert f"golden/input_0.pb: a symlink (to {real}); an artifacts directory holds regular files only: remove it" \
        in result.directory_problems
    r = device("check", art, "--rounds", "0", python=device_py)
    assert r.exit_code == 1 and "golden/input_0.pb is a symlink" in r.stdout, r.output


def test_a_golden_fifo_is_one_line_not_a_hang(tiny: Path, tmp_path: Path, device_py: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    (art / "golden" / "input_0.pb").unlink()
    os.mkfifo(art / "golden" / "input_0.pb")  # nothing ever writes to it: an open for reading would block
    p = subprocess.run([sys.executable, "-m", "edgeq", "verify", str(art), "--quiet", "--batch", "32", "--rounds", "1"],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "golden/input_0.pb: not a regular file or directory (a socket, pipe or device?)" in p.stderr, p.stderr
    r = device("check", art, "--rounds", "0", python=device_py, timeout=120)
    assert r.exit_code == 1 and "golden/input_0.pb: not a regular file" in r.stdout, r.output


# 11. verify: fidelity one sample at a time ----------------------------------------------------------------------


class BatchMix(nn.Module):
    """The model, plus a term from the batch's mean input, zero on the golden batch: a file exported from it
    agrees with the model on the golden inputs as one batch, and not one sample at a time."""

    def __init__(self, base: nn.Module, golden_mean: torch.Tensor) -> None:
        super().__init__()
        self.base, self.mean = base, nn.Parameter(golden_mean, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 0.05 * (x.mean(0, keepdim=True) - self.mean)[:, :3]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript-based ONNX exporter, as edgeq's
def test_verify_fails_an_fp32_file_whose_outputs_depend_on_the_rest_of_the_batch(
        tiny: Path, tmp_path: Path, user: Path, verify_worker) -> None:
    art = copy(tiny, tmp_path / "art")
    inputs = golden.read_tensor(art / "golden" / "input_0.pb")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()  # test_hardening2's `build`
    mixed = BatchMix(base, torch.from_numpy(inputs.mean(0, keepdims=True))).eval()
    torch.onnx.export(mixed, (torch.zeros(2, 8),), str(art / "user-fp32.onnx"), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    rehash(art, "user-fp32.onnx")
    result = verify(art, FAST, verify_worker)
    onnx_row = next(r for r in result.rows if r.name == "user-fp32-onnx")
    assert any("its outputs for one sample depend on the rest of the batch" in reason and "at batch 1" in reason
               for reason in onnx_row.reasons), onnx_row.reasons
    assert all(r.status != "FAIL" for r in result.rows if r.name != "user-fp32-onnx"), result.failures


def test_the_device_checker_imports_no_torch() -> None:
    p = subprocess.run([sys.executable, "-c", "import sys, edgeq.device.check, edgeq.device.plan, "
                        "edgeq.device.__main__; assert 'torch' not in sys.modules"],
                       capture_output=True, text=True, env=env())
    assert p.returncode == 0, p.stderr
