"""Hardening, second round: each test reproduces one attack or fault and asserts the promised outcome.

Real processes where the fault needs one (a SIGKILL between the publish renames, a process swapping
files under verify, a model calling os._exit), real file systems (tmpfs, read-only mounts; skipped
where they cannot be mounted), real pipes and FIFOs for keys. One tiny model (8 inputs, 3 classes)
keeps every export to seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgeq import publish
from edgeq.cli import main
from edgeq.data import as_arrays, batches, first_samples, sample
from edgeq.errors import ConfigError, DataError, EdgeqError, ExportError, SignatureError
from edgeq.manifest import sha256_file
from edgeq.signing import check_private_key, check_public_key, sign_directory
from edgeq.verify import VerifyConfig, verify
from edgeq.verify.command import verify as verify_command

FAST = VerifyConfig(batch=32, rounds=2, window_s=0.003, progress=False)
ROOT = Path(__file__).resolve().parents[1]
USER = '''
import numpy as np
import torch
from torch import nn


def build(width=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3)).eval()


def wide():
    return build(64)


def load():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(144, 8)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)).astype(np.int64)
    return (x[:96], y[:96]), (x[96:], y[96:])


def load3():
    train, test = load()
    return train, (train[0][:24], train[1][:24]), test


def exits():
    import sys
    sys.exit(3)
'''


def one_line_error(result, *needles: str) -> str:
    """Exit 1, one `edgeq: error:` line and nothing after it, no traceback; returns the line."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("edgeq: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user") / "user.py"
    path.write_text(USER)
    return path


def export_args(user: Path, out: Path, model: str = "build", *extra: str) -> list[str]:
    return ["export", "--model", f"{user}:{model}", "--data", f"{user}:load", "--variants", "none", "--quiet",
            "--out", str(out), *extra]


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(user: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real fp32 export of the tiny model (read-only: copy it before changing anything)."""
    out = tmp_path_factory.mktemp("tiny") / "art"
    r = cli(*export_args(user, out))
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("keys")
    key = ec.generate_private_key(ec.SECP256R1())
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    (d / "pub.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return {"key": d / "key.pem", "pub": d / "pub.pem"}


def copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def rehash(directory: Path, file: str) -> None:
    """Record a file's new size and sha256 in manifest.json, as anyone who can write the directory can."""
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    entries = [a for a in data["artifacts"] if a["file"] == file]
    entries += [data["dataset"][k] for k in ("eval", "val") if (data["dataset"].get(k) or {}).get("file") == file]
    for entry in entries:
        entry.update(bytes=(directory / file).stat().st_size, sha256=sha256_file(directory / file))
    path.write_text(json.dumps(data, indent=2) + "\n")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def wait_for(predicate, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        time.sleep(0.02)


@contextlib.contextmanager
def mounted(path: Path, options: str):
    """A real tmpfs at `path`; skips where it cannot be mounted (not root, no tmpfs)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# 1. data loss between the publish renames ------------------------------------------------------------


def test_a_kill_between_the_publish_renames_keeps_the_previous_export(user: Path, tiny: Path, tmp_path: Path) -> None:
    out = copy(tiny, tmp_path / "art")
    before = (out / "manifest.json").read_bytes()
    flag = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "edgeq", *export_args(user, out, "wide", "--no-executorch")],
                            env={**env(), publish.PAUSE_ENV: str(flag)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: flag.exists() or proc.poll() is not None)
        assert flag.exists(), proc.communicate()
        proc.send_signal(signal.SIGKILL)  # between `out -> .out.old-<pid>` and `tmp -> out`
        proc.wait(timeout=30)
    finally:
        proc.kill()
    old = [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.old-")]
    assert not out.exists() and len(old) == 1, sorted(p.name for p in tmp_path.iterdir())

    import edgeq

    def broken(model, data, epochs):
        return "not a module"  # the next export fails inside its build, after the stale clean-up

    (train, test) = load_user(user)
    with pytest.raises(ConfigError, match="finetune returned str"):
        edgeq.compress(build_user(user), train=train, test=test, out=out, finetune=broken, progress=False,
                       recipe=edgeq.Recipe(variants=("unstructured",)), log=lambda _: None)
    assert (out / "manifest.json").read_bytes() == before  # the last good export, restored
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".art.") and "lock" not in p.name) == []


def load_user(user: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("edgeq_test_user", user)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


def build_user(user: Path, width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3)).eval()


# 2. signature time-of-check / time-of-use ------------------------------------------------------------

SWAPPER = """
import os, sys, time
d, stage, names = sys.argv[1], sys.argv[2], sys.argv[3:]
versions = [{n: open(os.path.join(p, n), "rb").read() for n in names} for p in (d, os.path.join(stage, "tampered"))]
open(os.path.join(stage, "started"), "w").close()
i = 1
while True:
    for n in names:  # the file, then its re-hashed manifest: one rename each, from outside the directory
        tmp = os.path.join(stage, n + ".tmp")
        with open(tmp, "wb") as f:
            f.write(versions[i][n])
        os.replace(tmp, os.path.join(d, n))
    i ^= 1
    time.sleep(0.25)
"""


def _padded(src: Path, dst: Path) -> None:
    """The same model with 200 KB of unused weights: it answers exactly as the signed file, but is not it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(50_000, np.float32), "unused_padding"))
    onnx.save(model, str(dst))


@contextlib.contextmanager
def swapping(directory: Path, stage: Path, names: list[str]):
    """A real process swapping `names` between their signed and tampered bytes every 0.25 s."""
    proc = subprocess.Popen([sys.executable, "-c", SWAPPER, str(directory), str(stage), *names])
    try:
        wait_for(lambda: (stage / "started").exists() or proc.poll() is not None, 30)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_verify_never_measures_a_file_swapped_after_its_signature_was_checked(
        tiny: Path, keys: dict[str, Path], tmp_path: Path, verify_worker) -> None:
    signed = copy(tiny, tmp_path / "art")
    sign_directory(signed, keys["key"])
    name = "user-fp32.onnx"
    signed_bytes = (signed / name).stat().st_size
    tampered = copy(signed, tmp_path / "stage" / "tampered")
    _padded(signed / name, tampered / name)
    rehash(tampered, name)
    assert (tampered / name).stat().st_size != signed_bytes
    outcomes = []
    with swapping(signed, tmp_path / "stage", [name, "manifest.json"]):
        for _ in range(3):
            try:
                result = verify(signed, replace(FAST, public_key=str(keys["pub"])), verify_worker)
            except SignatureError as exc:
                outcomes.append("refused")
                assert "changed since it was signed" in str(exc) and str(tmp_path / "stage") not in str(exc)
                continue
            row = next(r for r in result.rows if r.file == name)
            assert row.bytes == signed_bytes, "verify measured bytes other than the ones it verified"
            outcomes.append("passed" if result.passed else "failed")
    assert "failed" not in outcomes, outcomes


# 3, 4. verify's own memory: an eval.npz bomb, a sparse checkpoint ---------------------------------------


def write_npz_bomb(path: Path, inputs_shape: tuple[int, ...], labels: int) -> None:
    """An .npz of zeros written in pieces: a few hundred KB on disk, `inputs_shape` float32 once loaded."""
    from numpy.lib import format as npy

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("inputs.npy", "w", force_zip64=True) as f:
            npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": inputs_shape})
            left, piece = int(np.prod(inputs_shape)) * 4, bytes(1 << 20)
            while left > 0:
                f.write(piece[: min(left, len(piece))])
                left -= len(piece)
        with z.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(labels, np.int64))


def tree_peak_rss(cmd: list[str], timeout: float = 120.0) -> tuple[subprocess.CompletedProcess, int]:
    """Run `cmd`; (its result, the peak resident bytes of it and all its descendants together, shared pages
    counted once), sampled from /proc every 10 ms."""
    def tree(pid: int) -> list[int]:
        found = [pid]
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    found += [p for child in f.read().split() for p in tree(int(child))]
        return found

    def rss(pid: int) -> int:
        """Proportional set size: pages shared with another process (a fork about to exec) count once."""
        for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
            with contextlib.suppress(OSError, StopIteration, ValueError):
                with open(f"/proc/{pid}/{name}") as f:
                    return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024
        return 0

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    peak, at_peak = 0, {}
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.communicate(timeout=timeout)))
    reader.start()
    while reader.is_alive():
        sizes = {p: rss(p) for p in tree(proc.pid)}
        if sum(sizes.values()) > peak:
            peak, at_peak = sum(sizes.values()), sizes
        time.sleep(0.01)
    reader.join()
    result = subprocess.CompletedProcess(cmd, proc.returncode, *out)
    result.at_peak = {pid: f"{n / 2**20:.0f} MiB" for pid, n in at_peak.items()}  # type: ignore[attr-defined]
    return result, peak


LIMIT_GB = 0.5
ALLOWED = int(LIMIT_GB * 2**30) + 300 * 10**6  # the limit plus 300 MB, parent and worker together


def test_an_eval_npz_bomb_is_refused_from_its_headers(tiny: Path, tmp_path: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    write_npz_bomb(art / "eval.npz", (32_768, 8, 256), 32_768)  # 0.3 MB on disk, 256 MiB loaded
    assert (art / "eval.npz").stat().st_size < 4 << 20
    rehash(art, "eval.npz")
    r, peak = tree_peak_rss([sys.executable, "-m", "edgeq", "verify", str(art), "--quiet",
                             "--memory-limit", str(LIMIT_GB)])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("edgeq: error: eval.npz: its arrays declare 0.25 GiB once loaded"), line
    assert "--memory-limit" in line
    assert peak < ALLOWED, f"verify and its worker peaked at {peak / 2**20:.0f} MiB: {r.at_peak}"


def test_a_sparse_file_posing_as_a_checkpoint_costs_verify_no_memory(tiny: Path, tmp_path: Path) -> None:
    art = copy(tiny, tmp_path / "art")
    ckpt = art / "user-fp32.ckpt.pt"
    with open(ckpt, "r+b") as f:
        f.truncate(512 << 20)  # 512 MiB, almost all of it a hole: read whole, it would break the bound
    rehash(art, ckpt.name)
    r, peak = tree_peak_rss([sys.executable, "-m", "edgeq", "verify", str(art), "--quiet", "--batch", "32",
                             "--rounds", "1", "--memory-limit", str(LIMIT_GB)])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "FAIL user-fp32-ckpt" in r.stderr or "user-fp32.ckpt.pt" in r.stderr, r.stderr
    assert peak < ALLOWED, f"verify and its worker peaked at {peak / 2**20:.0f} MiB: {r.at_peak}"


# 5, 18. keys: FIFOs never hang, pipes are read once ------------------------------------------------------


def test_a_fifo_as_key_is_one_line_not_a_hang(tiny: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    for check in (check_private_key, check_public_key):
        with pytest.raises(ConfigError, match="empty .*pipe or FIFO"):
            check(fifo)
    # in child processes, so that a key read that blocks on the FIFO is a killed child, not a stalled suite
    for args in (["verify", str(tiny), "--quiet", "--public-key", str(fifo)],
                 [*export_args(Path("user.py"), tmp_path / "art"), "--sign-key", str(fifo)]):
        r = subprocess.run([sys.executable, "-m", "edgeq", *args], capture_output=True, text=True, env=env(),
                           timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        [line] = [x for x in r.stderr.splitlines() if x.startswith("edgeq: error:")]
        assert str(fifo) in line and "FIFO" in line, line
    assert not (tmp_path / "art").exists()


@contextlib.contextmanager
def pipe_of(data: bytes):
    """`<(cat FILE)`: a real pipe holding `data`, readable once, as /dev/fd/N."""
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    try:
        yield f"/dev/fd/{read}"
    finally:
        os.close(read)


def test_keys_through_pipes_are_read_once(user: Path, keys: dict[str, Path], tmp_path: Path, verify_worker) -> None:
    out = tmp_path / "art"
    with pipe_of(keys["key"].read_bytes()) as key:
        r = cli(*export_args(user, out), "--sign-key", key)
    assert r.exit_code == 0, r.output
    assert (out / "edgeq.sig").is_file()
    with pipe_of(keys["pub"].read_bytes()) as pub:
        result = verify(out, replace(FAST, public_key=pub), verify_worker)
    assert result.passed and result.signature["status"] == "verified", result.failures


# 6. calibration batches of one size -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [100, 400, 97, 3, 384])
def test_calibration_batches_have_one_size(n: int) -> None:
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    cut = batches(x)
    assert len({len(b) for b in cut}) == 1 and np.array_equal(np.concatenate(cut), x)
    for samples in (1, 50, 128, n):
        firsts = first_samples(cut, samples)
        assert len({len(b) for b in firsts}) == 1
        assert np.array_equal(np.concatenate(firsts), x[:samples])


@pytest.mark.parametrize("method", ["Entropy", "Percentile"])
def test_entropy_and_percentile_calibrate_on_100_samples(tmp_path: Path, method: str) -> None:
    """The failing case as onnxruntime sees it: 100 training samples, fed in edgeq's calibration batches."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    model = build_user(Path())
    src = tmp_path / "fp32.onnx"
    torch.onnx.export(model, (torch.zeros(1, 8),), str(src), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    feeds = iter([{"input": b} for b in first_samples(batches(x), 100)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    quantize_static(str(src), str(tmp_path / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    calibrate_method=getattr(CalibrationMethod, method))
    assert (tmp_path / "int8.onnx").stat().st_size > 0


# 7, 15. every plan field is validated ---------------------------------------------------------------------


def _precision_entry() -> dict:
    return {"qdq": {"per_channel": False, "reduce_range": True, "calibrate_method": "MinMax", "exclude_nodes": [],
                    "relu_before_pool": True, "float_outputs": True, "crop_padding": True},
            "layers": [{"node": "/0/Gemm", "op": "Gemm", "precision": "int8", "reason": "measured"}],
            "weights": {"chosen": "per-tensor", "reason": "measured"},
            "cost": {"seconds": 1.0, "layers_tried": 1, "layers": 1},
            "calibration": {"method": "MinMax", "samples": 96, "candidates": [{"method": "MinMax", "samples": 96}]},
            "sensitivity": {"layers": [], "ranking": []}}


def _set(path: tuple, value):
    def edit(plan: dict) -> None:
        node = plan["models"]["user"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize(("edit", "needle"), [
    (_set(("precision", "fp32", "qdq", "bogus"), 1), "bogus"),
    (_set(("precision", "fp32", "calibration", "method"), "Bogus"), "Bogus"),
    (_set(("precision", "fp32", "calibration", "samples"), "abc"), "abc"),
    (_set(("precision", "fp32", "calibration", "samples"), -1), "-1"),
    (_set(("precision", "fp32", "qdq", "calibrate_method"), "Bogus"), "Bogus"),
    (_set(("precision", "fp32", "qdq", "per_channel"), "yes"), "yes"),
    (_set(("precision", "fp32", "layers"), [{"node": "/0/Gemm", "op": "Gemm", "precision": "int4", "reason": ""}]),
     "int4"),
    (_set(("ships", "user-static-onnx"), {"ship": True, "latency_vs_parent": {"1": -5.0}}), "-5.0"),
], ids=["qdq-extra-key", "calibration-method", "samples-string", "samples-negative", "qdq-method", "qdq-bool",
        "layer-precision", "negative-ratio"])
def test_an_edited_plan_is_one_line(tiny: Path, tmp_path: Path, edit, needle: str) -> None:
    plan = json.loads((tiny / "plan.json").read_text())
    plan["models"]["user"]["precision"]["fp32"] = _precision_entry()
    edit(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    one_line_error(cli("export", "--plan", path, "--out", tmp_path / "art", "--model", "mlp", "--quiet"),
                   f"--plan {path}", needle)


def test_an_infinite_plan_ratio_is_one_line(tiny: Path, tmp_path: Path) -> None:
    plan = json.loads((tiny / "plan.json").read_text())
    plan["models"]["user"]["ships"]["user-static-onnx"] = {"ship": True, "latency_vs_parent": {"1": 0.5}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan).replace('"1": 0.5', '"1": 1e999'))  # JSON that parses to infinity
    one_line_error(cli("export", "--plan", path, "--out", tmp_path / "art", "--model", "mlp", "--quiet"),
                   f"--plan {path}", "finite")


def test_a_valid_plan_still_reads(tiny: Path) -> None:
    from edgeq.plan import BuildPlan

    plan = json.loads((tiny / "plan.json").read_text())
    plan["models"]["user"]["precision"]["fp32"] = _precision_entry()
    assert BuildPlan.from_dict(plan).models["user"].precision["fp32"]["qdq"]["calibrate_method"] == "MinMax"
    BuildPlan.read(tiny / "plan.json")


# 8, 25. datasets -----------------------------------------------------------------------------------------


class Items(torch.utils.data.Dataset):
    def __init__(self, n: int, extra: int = 0, label=lambda i: i % 3) -> None:
        self.n, self.extra, self.label = n, extra, label

    def __len__(self) -> int:
        return self.n + self.extra

    def __getitem__(self, i: int):
        if i >= self.n:
            raise IndexError("index out of range")
        return torch.zeros(8), self.label(i)


@pytest.mark.parametrize(("data", "needle"), [
    (Items(10, extra=1), "len() = 11 but item 10 raised IndexError"),
    (Items(10, label=lambda i: "cat"), "item 0 has label 'cat'"),
    ((np.zeros((4, 8), np.float32), np.array(["a", "b", "a", "b"])), "labels are strings (first: 'a')"),
    ((np.zeros((4, 8), np.float32), np.array([0.5, 1, 2, 0])), "non-integer values (first: 0.5)"),
], ids=["len-too-long", "string-labels-dataset", "string-labels-arrays", "fractional-labels"])
def test_bad_datasets_are_one_line(data, needle: str) -> None:
    with pytest.raises(DataError) as caught:
        as_arrays(data, "train")
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_bool_labels_are_classes_0_and_1() -> None:
    x = np.zeros((4, 8), np.float32)
    y = np.array([True, False, True, True])
    assert as_arrays((x, y), "train").y.tolist() == [1, 0, 1, 1]
    assert as_arrays(Items(3, label=lambda i: bool(i % 2)), "train").y.tolist() == [0, 1, 0]


# 10. a model without parameters and QAT ---------------------------------------------------------------------


class Scale(nn.Module):
    """A classifier with no parameters: logits are the first three inputs, doubled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3] * 2.0


def test_qat_of_a_model_without_parameters_is_skipped_with_its_reason(user: Path, tmp_path: Path) -> None:
    import edgeq

    train, test = load_user(user)
    manifest = edgeq.compress(Scale(), train=train, test=test, out=tmp_path / "art", progress=False,
                              recipe=edgeq.Recipe(variants=("qat",)), log=lambda _: None)
    skipped = {s["name"]: s["reason"] for s in manifest.skipped}
    reason = skipped["model-qat-ts"]
    assert "no trainable parameters" in reason and "\n" not in reason, reason
    assert "model-qat-onnx" in skipped
    assert {a.precision for a in manifest.artifacts} == {"fp32"}


# 17, 21, 22, 23. --out checked up front ----------------------------------------------------------------------


def test_an_out_inside_an_export_is_refused(user: Path, keys: dict[str, Path], tmp_path: Path, tiny: Path) -> None:
    signed = copy(tiny, tmp_path / "signed")
    sign_directory(signed, keys["key"])
    before = sorted(p.name for p in signed.iterdir())
    for out in (signed / "inner", signed / "a" / "b"):
        one_line_error(cli(*export_args(user, out)), f"--out {out}", f"inside the edgeq export {signed}")
    assert sorted(p.name for p in signed.iterdir()) == before  # no lock file: the signature still holds


def test_a_non_utf8_out_is_refused_before_any_work(user: Path, tmp_path: Path, monkeypatch) -> None:
    from edgeq import build

    built: list[str] = []
    family = build._family
    monkeypatch.setattr(build, "_family", lambda b, name, *a, **k: built.append(name) or family(b, name, *a, **k))
    out = Path(os.fsdecode(bytes(tmp_path) + b"/art-\xff"))
    one_line_error(cli(*export_args(user, out)), "not valid UTF-8", "art-\\xff")
    assert built == [] and list(tmp_path.iterdir()) == []


def test_a_read_only_file_system_is_named_as_such(user: Path, tmp_path: Path) -> None:
    with mounted(tmp_path / "ro", "ro,size=1m") as ro:
        one_line_error(cli(*export_args(user, ro / "art")), f"--out {ro / 'art'}", "read-only")


def test_a_name_too_long_for_the_lock_and_temporary_names_is_refused(user: Path, tmp_path: Path) -> None:
    out = tmp_path / ("a" * 240)
    line = one_line_error(cli(*export_args(user, out)), "its name is 240 bytes", "at most 233 bytes")
    assert "shorter --out" in line
    assert list(tmp_path.iterdir()) == []  # no lock file left


# 20. a full TMPDIR is not blamed on --out ---------------------------------------------------------------------


def test_a_full_tmpdir_is_named_not_out(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "art"
    with mounted(tmp_path / "scratch", "size=256k") as scratch:
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        with pytest.raises(ExportError) as caught:
            with publish.staging(out):
                with tempfile.NamedTemporaryFile() as f:  # a scratch file, as onnxruntime's quantizer writes
                    f.write(bytes(1 << 20))
                    f.flush()
    message = str(caught.value)
    assert message.startswith(f"TMPDIR {scratch}: no space left") and "point TMPDIR" in message, message
    assert f"--out {out}: no space" not in message
    assert not out.exists()


# 19. verify reading while an export replaces the directory ----------------------------------------------------


REPLACER = """
import os, sys, time
d, other = sys.argv[1:3]
open(other + ".started", "w").close()
while True:  # what publishing does: the directory moved aside, the new one renamed in
    os.rename(d, d + ".old")
    os.rename(other, d)
    os.rename(d + ".old", other)
    time.sleep(0.05)
"""


def test_verify_while_an_export_replaces_the_directory_says_read_not_write(tiny: Path, tmp_path: Path,
                                                                          verify_worker) -> None:
    art, other = copy(tiny, tmp_path / "art"), copy(tiny, tmp_path / "other")
    proc = subprocess.Popen([sys.executable, "-c", REPLACER, str(art), str(other)])
    try:
        wait_for(lambda: Path(f"{other}.started").exists(), 30)
        for _ in range(3):
            try:
                verify(art, FAST, verify_worker)
            except EdgeqError as exc:  # a directory caught mid-swap: one line, never an OSError
                assert "write" not in str(exc), exc
        r = CliRunner().invoke(verify_command, [str(art), "--quiet", "--batch", "32", "--rounds", "1"])
        assert "Traceback" not in r.output and "cannot write" not in r.output, r.output
    finally:
        proc.kill()
        proc.wait()


# 24. a --model that exits ---------------------------------------------------------------------------------------


def test_a_model_calling_sys_exit_is_one_line(user: Path, tmp_path: Path) -> None:
    one_line_error(cli("export", "--model", f"{user}:exits", "--data", f"{user}:load", "--out", tmp_path / "art",
                       "--quiet"), f"--model {user}:exits: exits() called sys.exit(3) instead of returning")
    assert not (tmp_path / "art").exists()


def test_a_model_calling_os_exit_at_import_never_exits_0(user: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.py"
    model.write_text("import os\nos._exit(0)\n\ndef build():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "edgeq", "export", "--model", f"{model}:build", "--data",
                        f"{user}:load", "--out", str(tmp_path / "art"), "--quiet"], capture_output=True, text=True,
                       env=env(), timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgeq: error: --model {model}:build: importing {model} called "
                                                   "os._exit(0) instead of returning"), r.stderr
    assert not (tmp_path / "art").exists()


# the CLI: --data may return (train, val, test) -----------------------------------------------------------------


def test_data_may_return_train_val_test(user: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    args = export_args(user, out)
    args[args.index(f"{user}:load")] = f"{user}:load3"
    r = cli(*args)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["train_size"] == 96 and manifest["dataset"]["test_size"] == 48
