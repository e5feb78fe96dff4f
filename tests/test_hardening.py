"""Export and verify under bad input, hostile directories, full disks, kills and concurrent runs.

Each test reproduces one failure seen against a previous version and asserts the fixed behaviour:
exit code, one line naming the file and the fix, no traceback, and nothing already written lost.
Real files, real processes and real (tmpfs) file systems; a monkeypatch only where the condition
cannot be made for real (an unreadable file when the tests run as root).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeq import export as export_mod
from edgeq import publish
from edgeq.cli import main
from edgeq.errors import DataError, ExportError, ManifestError
from edgeq.manifest import read, sha256_file
from edgeq.examples import mnist
from edgeq.progress import StageLine, progress_bar
from edgeq.verify import VerifyConfig, verify
from edgeq.verify.command import verify as verify_command

QUICK = ["--model", "mlp", "--variants", "none", "--epochs", "1", "--no-executorch", "--quiet"]  # fp32 only: seconds
FAST_VERIFY = VerifyConfig(batch=32, rounds=2, window_s=0.003, progress=False)


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(result, *needles: str) -> None:
    """Exit 1, one `edgeq: error:` line, last, holding every needle; no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("edgeq: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture
def work(monkeypatch) -> list[str]:
    """What an export did: each training run and each model family it started to build (the real
    functions, counted). A refusal "before any work" leaves this empty."""
    from edgeq import build

    done: list[str] = []
    train, family = mnist.train_model, build._family

    def counted_train(arch, *args, **kwargs):
        done.append(f"train {arch}")
        return train(arch, *args, **kwargs)

    def counted_family(b, name, *args, **kwargs):
        done.append(f"build {name}")
        return family(b, name, *args, **kwargs)

    monkeypatch.setattr(mnist, "train_model", counted_train)
    monkeypatch.setattr(build, "_family", counted_family)
    return done


def quick_export(out: Path, force: bool = False) -> None:
    mnist.export(out, models=("mlp",), epochs=1, recipe_overrides={"variants": (), "executorch": False}, force=force,
                 progress=False, log=lambda s: None)


def hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (golden outputs live in a subfolder), by relative name."""
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in directory.rglob("*") if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") and not p.name.endswith(".lock"))


# 1. export never destroys what it did not create ----------------------------------------------------


def test_export_refuses_a_directory_it_did_not_write(tmp_path: Path) -> None:
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "important.txt").write_text("precious")
    r = cli("export", "--out", str(mine), *QUICK)
    one_line_error(r, f"--out {mine}", "important.txt", "--force")
    assert (mine / "important.txt").read_text() == "precious" and len(list(mine.iterdir())) == 1
    assert leftovers(tmp_path, "mydata") == []


def test_export_refuses_an_edgeq_directory_holding_a_foreign_file(tmp_path: Path) -> None:
    out = tmp_path / "art"
    quick_export(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="notes.txt, which its edgeq manifest does not list"):
        quick_export(out)
    assert (out / "notes.txt").read_text() == "mine"


def test_force_replaces_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "old.txt").write_text("x")
    quick_export(out, force=True)
    assert not (out / "old.txt").exists() and (out / "manifest.json").is_file()


@pytest.mark.parametrize("target", [".", "..", "sub/.."])
def test_export_refuses_the_current_directory_or_above(tmp_path: Path, monkeypatch, target: str,
                                                      work: list[str]) -> None:
    (tmp_path / "work" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "work" / "keep.txt").write_text("x")
    r = cli("export", "--out", target, *QUICK)
    one_line_error(r, "current directory or one above it", "--out artifacts")
    assert work == [], "refused only after work was done"
    assert (tmp_path / "work" / "keep.txt").read_text() == "x"


def test_export_refuses_a_file_and_a_symlink_as_out(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(cli("export", "--out", str(blocker), *QUICK), "exists and is not a directory")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    one_line_error(cli("export", "--out", str(tmp_path / "link"), *QUICK), "symbolic link")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_published_directory_has_normal_permissions(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        quick_export(tmp_path / "art")
    finally:
        os.umask(previous)
    assert (tmp_path / "art").stat().st_mode & 0o777 == mode


def test_a_second_concurrent_export_fails_cleanly_and_orphans_nothing(tmp_path: Path) -> None:
    from filelock import FileLock

    out = tmp_path / "art"
    quick_export(out)
    before = hashes(out)
    holder = subprocess.Popen(  # another process holds the export lock, as a running export does
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; "
         "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)",
         str(publish.lock_path(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cli("export", "--out", str(out), *QUICK)
        one_line_error(r, "another edgeq export is writing it", "lock")
    finally:
        holder.kill()
        holder.wait()
    assert hashes(out) == before
    assert leftovers(tmp_path, "art") == []
    FileLock(str(publish.lock_path(out)), timeout=0).acquire()  # released with its holder


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_stale_temp_directories_are_cleaned_only_when_their_owner_is_gone(tmp_path: Path) -> None:
    quick_export(tmp_path / "art")  # a whole export in place: a stale .old is then never the only copy
    dead, alive = _dead_pid(), os.getpid()
    stale = [tmp_path / f".art.tmp-{dead}-abc", tmp_path / f".art.old-{dead}-def"]
    live = tmp_path / f".art.tmp-{alive}-ghi"
    other = tmp_path / f".other.tmp-{dead}-jkl"  # another --out's: not ours to touch
    for d in (*stale, live, other):
        d.mkdir()
        (d / "x").write_text("x")
    quick_export(tmp_path / "art")
    assert not any(d.exists() for d in stale)
    assert live.exists() and other.exists()


def _wait_for(predicate, timeout: float = 120.0) -> None:
    t0 = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - t0 < timeout, "timed out waiting"
        time.sleep(0.05)


def _start_export(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgeq", "export", "--out", str(out), "--model", "mlp",
                             "--variants", "static", "--epochs", "1", "--no-executorch", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _mid_build(parent: Path, name: str) -> bool:
    """True once a temporary build directory holds its first artifact."""
    return any(p.name.startswith(f".{name}.tmp-") and any(p.iterdir()) for p in parent.iterdir())


def test_sigterm_cleans_up_like_sigint_and_keeps_the_previous_export(tmp_path: Path) -> None:
    out = tmp_path / "art"
    quick_export(out)
    before = hashes(out)
    proc = _start_export(out)
    try:
        _wait_for(lambda: _mid_build(tmp_path, "art"))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"{out} is unchanged" in err
    assert leftovers(tmp_path, "art") == []
    assert hashes(out) == before


def test_sigkill_leftovers_are_removed_by_the_next_export(tmp_path: Path) -> None:
    out = tmp_path / "art"
    proc = _start_export(out)
    try:
        _wait_for(lambda: _mid_build(tmp_path, "art"))
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert leftovers(tmp_path, "art"), "a killed export leaves its temporary directory"
    quick_export(out)
    assert leftovers(tmp_path, "art") == [] and (out / "manifest.json").is_file()


# disk full -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real, small file system; skips the test where it cannot be mounted (not root, no tmpfs)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the monkeypatched ENOSPC test covers the logic")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_disk_too_small_is_refused_before_any_work(tmp_path: Path, work: list[str]) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        r = cli("export", "--out", str(disk / "art"), *QUICK)
        one_line_error(r, f"--out {disk / 'art'}", "MiB free", "another disk")
        assert list(disk.iterdir()) == []
    # the space needed is known once the model's size is: after training, before any build
    assert not [w for w in work if w.startswith("build")], work


def test_disk_full_during_export_is_one_line_and_removes_the_temp_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(publish, "check_free_space", lambda out, n: None)  # let it run into the wall
    with tmpfs(tmp_path / "disk", "2m") as disk:
        r = cli("export", "--out", str(disk / "art"), "--model", "mlp", "--variants", "static", "--epochs", "1",
                "--quiet")
        one_line_error(r, "no space left", "another disk")
        assert [p.name for p in disk.iterdir()] == [".art.lock"]
        assert shutil.disk_usage(disk).used < 64 << 10


def test_enospc_from_any_writer_is_one_line(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "art"
    quick_export(out)
    before = hashes(out)

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(export_mod, "write_file", full)
    r = cli("export", "--out", str(out), *QUICK)
    one_line_error(r, "no space left", f"--out {out}")
    assert hashes(out) == before
    assert leftovers(tmp_path, "art") == []


# data sanity -----------------------------------------------------------------------------------------


def write_mnist(root: Path, train: tuple[int, int], test: tuple[int, int], max_label: int = 9) -> Path:
    """MNIST/raw in torchvision's idx layout: (images, labels) counts per split, labels 0..max_label."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, (n_img, n_lab) in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(n_img, 28, 28), dtype=np.uint8)
        labels = (np.arange(n_lab) % (max_label + 1)).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">4i", 2051, n_img, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 2049, n_lab) + labels.tobytes())
    return root


@pytest.mark.parametrize("train, test, max_label, needle", [
    ((2000, 1000), (100, 100), 9, "2000 train images but 1000 labels"),
    ((200, 200), (100, 100), 199, "train labels range over [0, 199], expected 0..9"),
])
def test_inconsistent_mnist_is_refused_before_training(tmp_path: Path, train, test, max_label, needle) -> None:
    data = write_mnist(tmp_path / "mnist", train, test, max_label)
    r = cli("export", "--out", str(tmp_path / "art"), "--data-dir", str(data), *QUICK)
    one_line_error(r, f"--data-dir {data}", needle)
    assert not (tmp_path / "art").exists() and leftovers(tmp_path, "art") == []


def test_garbage_data_files_are_one_line_in_export_and_verify(tmp_path: Path, mlp_artifacts: Path) -> None:
    data = write_mnist(tmp_path / "mnist", (100, 100), (100, 100))
    for f in (data / "MNIST" / "raw").iterdir():
        f.write_bytes(os.urandom(300))
    one_line_error(cli("export", "--out", str(tmp_path / "art"), "--data-dir", str(data), *QUICK),
                   "MNIST not found or malformed")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(os.urandom(300))
    r = CliRunner().invoke(verify_command, [str(mlp_artifacts), "--data", str(garbage), "--quiet"])
    one_line_error(r, "garbage.npz", "not a readable .npz")


def test_dataset_description_matches_the_data(tmp_path: Path) -> None:
    from edgeq.examples.mnist import load_data

    ds = load_data(write_mnist(tmp_path / "mnist", (300, 300), (100, 100)))
    assert "300 train / 100 test" in ds.description and "not the official" in ds.description


# manifests and files verify cannot trust --------------------------------------------------------------


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "art"))


def test_nan_accuracy_in_a_manifest_is_one_line(tmp_path: Path, mlp_artifacts: Path) -> None:
    art = _copy(mlp_artifacts, tmp_path)
    text = (art / "manifest.json").read_text()
    data = json.loads(text)
    data["artifacts"][0]["accuracy"] = float("nan")
    (art / "manifest.json").write_text(json.dumps(data))  # Python writes NaN, as a hostile editor would
    one_line_error(CliRunner().invoke(verify_command, [str(art), "--quiet"]), "manifest.json", "NaN")


def test_a_deeply_nested_manifest_is_one_line(tmp_path: Path) -> None:
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(CliRunner().invoke(verify_command, [str(art), "--quiet"]), "nested too deeply")


def test_a_file_given_as_dir_says_so(mlp_artifacts: Path) -> None:
    r = CliRunner().invoke(verify_command, [str(mlp_artifacts / "manifest.json"), "--quiet"])
    one_line_error(r, "is a file, not a directory")


def make_unreadable(path: Path, monkeypatch) -> None:
    """chmod 0; as root, who reads any file, `open` of this path refuses as a permission error would."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real_open = open

    def guarded(file, *args, **kwargs):
        if Path(str(file)) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded)


def test_an_unreadable_manifest_is_reported_as_unreadable(tmp_path: Path, mlp_artifacts: Path, monkeypatch) -> None:
    art = _copy(mlp_artifacts, tmp_path)
    manifest = art / "manifest.json"
    make_unreadable(manifest, monkeypatch)
    with pytest.raises(ManifestError, match="cannot read .*Permission denied.*check its permissions"):
        read(art)


def test_a_malicious_pickle_checkpoint_is_refused_without_unsafe_advice(tmp_path: Path, mlp_artifacts: Path) -> None:
    art = _copy(mlp_artifacts, tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ckpt = art / "mlp-fp32.ckpt.pt"
    buffer = io.BytesIO()
    torch.save({"config": Evil(), "state_dict": {}}, buffer)
    ckpt.write_bytes(buffer.getvalue())
    data = json.loads((art / "manifest.json").read_text())
    entry = next(a for a in data["artifacts"] if a["file"] == ckpt.name)
    entry.update(bytes=ckpt.stat().st_size, sha256=sha256_file(ckpt))
    (art / "manifest.json").write_text(json.dumps(data))
    result = verify(art, FAST_VERIFY)
    base = next(r for r in result.rows if r.name == "mlp-fp32-ckpt" and r.runtime == "torch-cpu")
    assert base.status == "FAIL"
    reason = " ".join(base.reasons)
    assert "refused" in reason and "could run code" in reason
    assert "weights_only" not in reason and "False" not in reason


# progress off a terminal ------------------------------------------------------------------------------


def test_progress_off_a_terminal_is_one_line_per_stage() -> None:
    log = io.StringIO()
    bar = progress_bar(100, "mlp: train", file=log)
    assert isinstance(bar, StageLine)
    for _ in range(100):
        bar.update()
    bar.set_postfix(loss="0.123")
    bar.close()
    bar.close()
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == [log.getvalue().strip()]
    assert log.getvalue().startswith("mlp: train: 100 step in ") and "loss=0.123" in log.getvalue()


def test_export_log_off_a_terminal_has_no_progress_frames(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "art"), "--model", "mlp", "--variants", "none",
                                  "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert "\r" not in r.output
    assert sum(line.startswith("mlp: train: ") for line in r.output.splitlines()) == 1


def test_an_unreadable_artifact_fails_its_row_only(tmp_path: Path, mlp_artifacts: Path, monkeypatch) -> None:
    art = _copy(mlp_artifacts, tmp_path)
    target = art / "mlp-static.onnx"
    make_unreadable(target, monkeypatch)
    result = verify(art, FAST_VERIFY)
    bad = [r for r in result.rows if r.status == "FAIL"]
    assert [r.name for r in bad] == ["mlp-static-onnx"]
    assert bad[0].reasons == ["mlp-static.onnx: cannot read (Permission denied); check its permissions"]
    assert all(r.status in ("ok", "skipped") for r in result.rows if r.name != "mlp-static-onnx")
