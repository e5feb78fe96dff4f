"""Where an export lands, and how it gets there without losing anything that was already on disk.

`staging(out, ...)` is the one way a build reaches `--out`:
- `out` is checked before any work: it must be absent, empty, or a previous edgeq export holding
  only the files its manifest accounts for, at any depth (`--force` replaces anything else), and
  never the current directory or one above it;
- a lock beside `out` (filelock) serialises concurrent exports to it; the loser fails at once;
- first under the lock, a previous export a killed run left aside (`.<out>.old-<pid>-*`) goes back
  to `out` when `out` is missing or empty; leftovers of killed runs are removed only once the
  process that made them is gone, and an `.old` copy only once `out` holds a whole export;
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
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgeq.bundle import pid_alive, raise_if_interrupted, signals_received, terminate_as_interrupt
from edgeq.errors import ExportError
from edgeq.manifest import MANIFEST_NAME
from edgeq.signing import GITKEEP, SIGNATURE_NAME

# files an export writes besides its artifacts; a directory holding anything else is not replaced
OWN_FILES = frozenset({MANIFEST_NAME, GITKEEP, SIGNATURE_NAME})
FREE_SPACE_MARGIN = 1.25  # the expected size is an estimate: ask for a quarter more
FREE_SPACE_SLACK = 4 << 20  # bytes: temporary files of quantization, the manifest, file-system blocks
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# the longest name built on `.<out>.`: "old-<pid>-" + mkdtemp's 8 characters, the pid at its largest
STALE_PREFIX_PAD = "old-4194304-xxxxxxxx"
PAUSE_ENV = "EDGEQ_TEST_PAUSE_PUBLISH"  # tests only: a file the publish step creates, then waits, between renames
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
    check_name(out)
    flag = f"--out {out}"
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or cwd.is_relative_to(resolved):
        raise ExportError(f"{flag}: is the current directory or one above it, and an export replaces its --out; "
                          "choose a new subdirectory such as --out artifacts")
    if out.is_symlink():
        raise ExportError(f"{flag}: is a symbolic link; pass the directory itself or choose another --out")
    inside = enclosing_export(resolved)
    if inside is not None:
        raise ExportError(f"{flag}: is inside the edgeq export {inside}; writing there changes a published export "
                          "(its manifest and signature no longer match): choose an --out outside it")
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


def check_name(out: Path) -> None:
    """Refuse, up front, an --out name the file system or the export's own files cannot hold: not UTF-8
    (manifests and runtimes take text paths), or too long once the lock and temporary names are built on it."""
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        flag = "--out " + os.fsencode(out).decode("utf-8", "backslashreplace")
        raise ExportError(f"{flag}: the path is not valid UTF-8 (its bytes were written in another encoding); "
                          "choose an --out with a UTF-8 name") from None
    parent = out.parent if str(out.parent) else Path(".")
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX") if parent.is_dir() else 255
    except (OSError, ValueError):
        limit = 255
    longest = len(os.fsencode(f".{out.name}.{STALE_PREFIX_PAD}"))
    if longest > limit:
        room = limit - (longest - len(os.fsencode(out.name)))
        raise ExportError(f"--out {out}: its name is {len(os.fsencode(out.name))} bytes; an export keeps a lock and "
                          f"temporary directories beside it named after it, so the name may be at most {room} bytes "
                          f"on this file system ({limit} per name): choose a shorter --out")


def enclosing_export(path: Path) -> Path | None:
    """The nearest directory above `path` (not `path` itself) holding an edgeq manifest or signature."""
    for parent in path.parents:
        if (parent / SIGNATURE_NAME).is_file() or _edgeq_manifest(parent / MANIFEST_NAME) is not None:
            return parent
    return None


def _edgeq_manifest(path: Path) -> dict | None:
    """The parsed manifest at `path` when edgeq wrote it (it names the edgeq version); None otherwise."""
    try:
        if path.is_symlink() or not path.is_file():
            return None
        with open(path, "rb") as f:
            data = json.loads(f.read(16 << 20))
        return data if isinstance(data["environment"]["edgeq"], str) else None
    except Exception:  # unreadable, not JSON, or another program's manifest.json
        return None


def listed_files(data: dict) -> set[str]:
    """Every file an edgeq manifest names, as relative POSIX paths: artifacts, eval.npz, val.npz, the
    plan and the golden files (nested in their folder). Raises on a manifest that is not edgeq's."""
    files = {a["file"] for a in data["artifacts"]}
    for entry in ((data.get("dataset") or {}).get("eval"), (data.get("dataset") or {}).get("val"), data.get("plan")):
        if isinstance((entry or {}).get("file"), str):
            files.add(entry["file"])
    golden = data.get("golden") or {}
    nested = [golden.get("input", {}).get("file")] + [o.get("file") for o in golden.get("outputs", {}).values()]
    nested += [o.get("file") for o in golden.get("reference", {}).values()]
    files.update(f for f in nested if isinstance(f, str))
    if not all(isinstance(f, str) for f in files):
        raise TypeError("a file name that is not a string")
    return files


def foreign_entry(out: Path) -> str | None:
    """Why `out` is not safe to replace (None when it is empty or a previous edgeq export, in full).

    Every entry at every depth must be one the export wrote: a file its manifest lists (a regular
    file), or a folder on the way to one (a real folder). Anything else, such as a note beside the
    golden files, is the user's, and replacing `out` would delete it."""
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    if not [e for e in entries if e != GITKEEP]:
        return None
    if MANIFEST_NAME not in entries:
        return f"is not empty and holds no edgeq manifest ({entries[0]}{', ...' if len(entries) > 1 else ''})"
    data = _edgeq_manifest(out / MANIFEST_NAME)
    if data is None:
        return f"holds a {MANIFEST_NAME} that edgeq did not write"
    try:
        files = listed_files(data) | OWN_FILES
    except Exception:  # not an edgeq manifest: not ours to delete
        return f"holds a {MANIFEST_NAME} that edgeq did not write"
    folders = {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}
    return _foreign_below(out, "", files, folders)


def _foreign_below(directory: Path, prefix: str, files: set[str], folders: set[str]) -> str | None:
    """The first entry under `directory` (named `prefix` inside `out`) that is neither a listed regular
    file nor a real folder leading to one; None when there is none."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        return f"holds {prefix.rstrip('/') or '.'}, which cannot be listed ({exc.strerror})"
    for name in names:
        rel, path = prefix + name, directory / name
        try:
            mode = path.lstat().st_mode
        except OSError:
            continue  # gone meanwhile
        if rel in files:
            if not stat.S_ISREG(mode):
                return f"holds {rel}, which is not a regular file an export writes"
        elif rel in folders:
            if not stat.S_ISDIR(mode):
                return f"holds {rel}, which is not the folder an export writes"
            found = _foreign_below(path, rel + "/", files, folders)
            if found is not None:
                return found
        else:
            return f"holds {rel}, which its edgeq manifest does not list"
    return None


def complete_export(path: Path) -> bool:
    """Whether `path` holds a whole edgeq export: its manifest is edgeq's and every file it lists is there."""
    data = _edgeq_manifest(path / MANIFEST_NAME)
    if data is None:
        return False
    try:
        files = listed_files(data)
    except Exception:
        return False
    return all((path / f).is_file() and not (path / f).is_symlink() for f in files
               if not Path(f).is_absolute() and ".." not in Path(f).parts)


def clean_stale(out: Path) -> list[Path]:
    """Restore the previous export a killed run left aside, then remove what killed runs left behind.

    `.<out>.tmp-<pid>-*` is a build that never finished; `.<out>.old-<pid>-*` is the previous `out`,
    moved aside just before the new build took its place. Only leftovers whose process is gone count.
    When `out` is missing, or an empty folder (a script's `mkdir -p` after the kill), the run was
    killed between the two renames: the newest `.old` is renamed back to `out` before anything else
    touches it. Any other `.old` is removed only when `out` then holds a whole edgeq export, so the
    only complete copy of an export is never deleted. Returns the paths removed.
    """
    removed = []
    stale = {kind: sorted((p for p in out.parent.glob(f".{out.name}.{kind}-*") if _dead_owner(out, kind, p)),
                          key=_mtime) for kind in ("tmp", "old")}
    if stale["old"] and _vacant(out):
        _restore(stale["old"].pop(), out)  # the newest: the export the killed run replaced
    for path in stale["tmp"]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if stale["old"] and complete_export(out):
        for path in stale["old"]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _vacant(out: Path) -> bool:
    """`out` is missing, or a real folder holding nothing but an empty .gitkeep."""
    if not os.path.lexists(out):
        return True
    if out.is_symlink() or not out.is_dir():
        return False
    try:
        entries = os.listdir(out)
    except OSError:
        return False
    return all(e == GITKEEP and (out / e).is_file() and not (out / e).is_symlink() and (out / e).stat().st_size == 0
               for e in entries)


def _restore(old: Path, out: Path) -> None:
    """Rename `old` back to `out`; an empty `out` is replaced in the same rename (POSIX replaces an empty
    directory), so there is no moment without either. A .gitkeep `out` held is kept."""
    keep = os.path.lexists(out / GITKEEP)
    try:
        if keep:
            (out / GITKEEP).unlink()
        os.rename(old, out)
        if keep:
            (out / GITKEEP).touch()
    except OSError as exc:
        raise ExportError(f"--out {out}: a killed export left the previous export in {old}, and it cannot be "
                          f"moved back ({exc.strerror}); move it back to {out} by hand, then export again") from None


def _dead_owner(out: Path, kind: str, path: Path) -> bool:
    pid = path.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
    return pid.isdigit() and not pid_alive(int(pid)) and path.is_dir() and not path.is_symlink()


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def check_free_space(out: Path, expected_bytes: int) -> None:
    """Refuse a build that would not fit on the file system of `out` (with margin and slack), or a
    file system that is read-only."""
    need = int(expected_bytes * FREE_SPACE_MARGIN) + FREE_SPACE_SLACK
    if os.statvfs(out.parent).f_flag & os.ST_RDONLY:
        raise ExportError(f"--out {out}: its file system is mounted read-only; choose an --out on a writable disk")
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise ExportError(f"--out {out}: {_mib(free)} free on its file system, the export needs about {_mib(need)}; "
                          "free some space or choose an --out on another disk")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


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
    with terminate_as_interrupt():
        seen = signals_received()
        lock = _lock(out)
        try:
            clean_stale(out)  # first: a previous export a killed run left aside goes back to `out`
            check_out(out, force)  # again, now that no other export can change it
            check_free_space(out, expected_bytes)
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
            except OSError as exc:
                raise _disk_error(out, exc) or ExportError(
                    f"--out {out}: cannot write in {out.parent} ({exc.strerror}); choose a writable --out") from None
            try:
                yield tmp
                raise_if_interrupted(seen)  # a signal some library swallowed mid-build: nothing is published
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
    the failure shows later as a corrupt file). The file system is told by device, not by path: a full
    temporary directory (TMPDIR, where torch and onnxruntime write their scratch files) is named as such,
    even when it is mounted below `out`'s parent, and is never blamed on `out`."""
    enospc = isinstance(exc, OSError) and exc.errno in NO_SPACE
    out_full = shutil.disk_usage(out.parent).free < FULL_BELOW
    if not enospc and (isinstance(exc, ExportError) or not out_full):
        return None
    filename = os.fsdecode(exc.filename) if isinstance(exc, OSError) and exc.filename else None
    scratch = tempfile.gettempdir()
    out_dev, scratch_dev = _device(out.parent), _device(Path(scratch))
    where = _device(Path(filename)) if filename is not None else None
    if where == out_dev or (where is None and (out_full or scratch_dev == out_dev)):
        return ExportError(f"--out {out}: no space left on its file system ({getattr(exc, 'strerror', None) or exc}); "
                           "nothing was published and the temporary files are removed; free some space or choose an "
                           "--out on another disk")
    if where is not None and where != scratch_dev:
        return ExportError(f"{filename}: no space left on its file system; nothing was published to --out {out}: "
                           "free some space there")
    return ExportError(f"TMPDIR {scratch}: no space left on a device while building, and not on --out's, which has "
                       f"{_mib(shutil.disk_usage(out.parent).free)} free (torch and onnxruntime write their scratch "
                       "files to TMPDIR); nothing was published: free some space there, or point TMPDIR at a disk "
                       "with room")


def _device(path: Path) -> int | None:
    """The device number of the file system holding `path` (its nearest existing parent when it is gone)."""
    for p in (path, *path.parents):
        try:
            return os.stat(p).st_dev
        except OSError:
            continue
    return None


def _pause_for_tests() -> None:
    """Tests only: with EDGEQ_TEST_PAUSE_PUBLISH=FILE, create FILE and wait (up to a minute) between the
    two renames, so that a test can kill the process exactly there. Never set outside the tests."""
    flag = os.environ.get(PAUSE_ENV)
    if flag:
        Path(flag).touch()
        deadline = time.monotonic() + 60
        while Path(flag).exists() and time.monotonic() < deadline:
            time.sleep(0.02)


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
        _pause_for_tests()
        os.rename(tmp, out)
    except OSError as exc:
        os.rename(old, out)
        raise ExportError(f"--out {out}: could not replace it ({exc.strerror}); the previous artifacts are unchanged") from None
    except BaseException:  # SIGINT or SIGTERM between the renames: the previous export goes back first
        if not os.path.lexists(out):  # (once the new build is in, the .old is a leftover the next export removes)
            os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
