"""Where an export lands, and how it gets there without losing anything that was already on disk.

`staging(out, ...)` is the one way a build reaches `--out`:
- `out` is checked before any work: it must be absent, empty, or a previous edgeq export holding
  only the files its manifest accounts for (`--force` replaces anything else), and never the
  current directory or one above it;
- a lock beside `out` (filelock) serialises concurrent exports to it; the loser fails at once;
- leftovers of killed runs (`.<out>.tmp-<pid>-*`, `.<out>.old-<pid>-*`) are removed, only once
  the process that made them is gone;
- free space is checked against the expected size of the build;
- the build goes into a temporary directory beside `out`, then is swapped in with two renames
  (the previous directory is restored if the second fails); any failure, SIGINT or SIGTERM
  removes the temporary directory; a full disk becomes one line, not a traceback;
- the published directory gets the user's normal permissions (0777 less the umask), not
  mkdtemp's 0700.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from edgeq.errors import ExportError
from edgeq.manifest import MANIFEST_NAME
from edgeq.signing import GITKEEP, SIGNATURE_NAME

# files an export writes besides its artifacts; a directory holding anything else is not replaced
OWN_FILES = frozenset({MANIFEST_NAME, GITKEEP, SIGNATURE_NAME})
FREE_SPACE_MARGIN = 1.25  # the expected size is an estimate: ask for a quarter more
FREE_SPACE_SLACK = 4 << 20  # bytes: temporary files of quantization, the manifest, file-system blocks
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
FULL_BELOW = 64 << 10  # bytes free under which a failed build is put down to a full disk


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _mode() -> int:
    """0777 less the process umask (read by setting it and putting it straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask


def check_out(out: Path, force: bool = False) -> None:
    """Refuse an --out that publishing would damage: raises ExportError with the fix, before any work."""
    flag = f"--out {out}"
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or cwd.is_relative_to(resolved):
        raise ExportError(f"{flag}: is the current directory or one above it, and an export replaces its --out; "
                          "choose a new subdirectory such as --out artifacts")
    if out.is_symlink():
        raise ExportError(f"{flag}: is a symbolic link; pass the directory itself or choose another --out")
    if not out.exists():
        if not out.parent.is_dir():
            raise ExportError(f"{flag}: parent directory {out.parent} does not exist; create it or choose another --out")
        return
    if not out.is_dir():
        raise ExportError(f"{flag}: exists and is not a directory; choose another --out")
    if force:
        return
    foreign = foreign_entry(out)
    if foreign is not None:
        raise ExportError(f"{flag}: {foreign}; an export replaces its --out whole, so choose an empty or new "
                          "--out, move that away, or pass --force to replace it anyway")


def foreign_entry(out: Path) -> str | None:
    """Why `out` is not safe to replace (None when it is empty or a previous edgeq export, in full)."""
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    if not [e for e in entries if e != GITKEEP]:
        return None
    if MANIFEST_NAME not in entries:
        return f"is not empty and holds no edgeq manifest ({entries[0]}{', ...' if len(entries) > 1 else ''})"
    try:
        with open(out / MANIFEST_NAME, "rb") as f:
            data = json.loads(f.read(16 << 20))
        files = {a["file"] for a in data["artifacts"]}
        eval_file = (data.get("dataset") or {}).get("eval", {}).get("file")
        if isinstance(eval_file, str):
            files.add(eval_file)
        plan_file = (data.get("plan") or {}).get("file")
        if isinstance(plan_file, str):
            files.add(plan_file)
        made_by_edgeq = isinstance(data["environment"]["edgeq"], str)
    except Exception:  # unreadable, not JSON, or not an edgeq manifest: not ours to delete
        return f"holds a {MANIFEST_NAME} that edgeq did not write"
    if not made_by_edgeq:
        return f"holds a {MANIFEST_NAME} that edgeq did not write"
    for name in entries:
        path = out / name
        if name in OWN_FILES or name in files:
            if path.is_symlink() or not path.is_file():
                return f"holds {name}, which is not a regular file an export writes"
            continue
        return f"holds {name}, which its edgeq manifest does not list"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove `.<out>.tmp-<pid>-*` and `.<out>.old-<pid>-*` left by runs whose process is gone."""
    removed = []
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_free_space(out: Path, expected_bytes: int) -> None:
    """Refuse a build that would not fit on the file system of `out` (with margin and slack)."""
    need = int(expected_bytes * FREE_SPACE_MARGIN) + FREE_SPACE_SLACK
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise ExportError(f"--out {out}: {_mib(free)} free on its file system, the export needs about {_mib(need)}; "
                          "free some space or choose an --out on another disk")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt here, like SIGINT, so the same clean-up runs; restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _lock(out: Path):
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path(out)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ExportError(f"--out {out}: another edgeq export is writing it (lock {lock_path(out)}); "
                          "wait for it to finish or choose another --out") from None
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot create the lock {lock_path(out)} ({exc.strerror}); "
                          "choose a writable --out") from None
    return lock


@contextlib.contextmanager
def staging(out: Path, *, force: bool = False, expected_bytes: int = 0) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; publish it as `out` when the block succeeds.

    On any exception (SIGINT and SIGTERM included) the temporary directory is removed and `out` is
    left as it was. ENOSPC/EDQUOT anywhere in the block or the publish becomes an ExportError.
    """
    out = Path(out)
    check_out(out, force)
    check_free_space(out, expected_bytes)  # before the lock file is even created
    with _sigterm_as_interrupt():
        lock = _lock(out)
        try:
            check_out(out, force)  # again, now that no other export can change it
            clean_stale(out)
            check_free_space(out, expected_bytes)
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
            except OSError as exc:
                raise _disk_error(out, exc) or ExportError(
                    f"--out {out}: cannot write in {out.parent} ({exc.strerror}); choose a writable --out") from None
            try:
                yield tmp
                _publish(tmp, out)
            except Exception as exc:
                error = _disk_error(out, exc)
                if error is None:
                    raise
                raise error from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone already once published
        finally:
            lock.release()


@contextlib.contextmanager
def disk_full_as_enospc(directory: Path) -> Iterator[None]:
    """Re-raise a failure inside the block as OSError(ENOSPC) when `directory`'s file system is full.

    onnx's and onnxruntime's C++ writers (shape inference, pre-processing) truncate a file on a full
    disk without an error; the failure surfaces later as a corrupt model. Checked before the
    block's temporary files are cleaned up, which would free the space again.
    """
    try:
        yield
    except Exception as exc:
        if isinstance(exc, OSError) or shutil.disk_usage(directory).free >= FULL_BELOW:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory)) from None


def _disk_error(out: Path, exc: Exception) -> ExportError | None:
    """The one-line error for a full disk: ENOSPC/EDQUOT, or any failure while the file system of `out`
    is full (some writers, such as onnxruntime's C++ model writer, truncate a file without raising, and
    the failure shows later as a corrupt file)."""
    if not (isinstance(exc, OSError) and exc.errno in NO_SPACE):
        if isinstance(exc, ExportError) or shutil.disk_usage(out.parent).free >= FULL_BELOW:
            return None
    return ExportError(f"--out {out}: no space left on its file system ({exc.strerror}); nothing was published and "
                       f"the temporary files are removed; free some space or choose an --out on another disk")


def _publish(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp`: the old directory is moved aside, and restored if the swap fails."""
    if (out / GITKEEP).is_file():
        (tmp / GITKEEP).touch()
    os.chmod(tmp, _mode())
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as exc:
        os.rename(old, out)
        raise ExportError(f"--out {out}: could not replace it ({exc.strerror}); the previous artifacts are unchanged") from None
    shutil.rmtree(old, ignore_errors=True)
