"""A bundle's files, read safely: the one reader for every path a manifest names, and the private copy
that `edgeq verify` and `python -m edgeq.device check` both check and run.

A manifest is input from whoever wrote the directory. Every path it names (artifacts, eval/val, the
plan, golden inputs, outputs and references, calibration data) is checked here before anything opens,
copies or hashes it: relative, no `..`, every component a regular directory and the file a regular
file by `lstat` (no symlink, FIFO or device anywhere on its path), its size bounded before any read.

The private copy is made by walking the directory with file descriptors (`openat` without following
links), so a folder swapped for a symlink while it is copied is never followed, and it is only ever
*created*: nothing a manifest names is opened for writing, moved or deleted, in the directory or
outside it. Its name carries the owner's pid (`edgeq-<kind>-<pid>-*` in TMPDIR), so that the next
run removes a copy whose process was killed; SIGTERM, like SIGINT, removes it on the way out.

Standard library and numpy only, and no model-signing, jsonschema or onnx: the device checker imports
this module on a device. That is why it is not edgeq/verify/integrity.py, which checks an export
against its jsonschema'd Manifest and parses ONNX files (verify's side only).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from edgeq.errors import DataError, IntegrityError

CHUNK = 1 << 20  # bytes per read while copying and hashing: memory stays flat whatever the file size
_ZEROS = bytes(CHUNK)
COPY_MARGIN = 16 << 20  # bytes of slack asked of TMPDIR beyond the copy itself
EVAL_SHARE = 0.25  # of the memory limit: the most evaluation arrays or a golden tensor may declare
KINDS = ("verify", "device")  # the private copies: edgeq-verify-<pid>-*, edgeq-device-<pid>-*
_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


# -- one path a manifest names ----------------------------------------------------------------------------


def unsafe(rel: object) -> str | None:
    """Why `rel` cannot name a file inside a bundle, from its text alone; None when it can."""
    if not isinstance(rel, str) or not rel:
        return f"{rel!r} is not a file name"
    if "\0" in rel or "\\" in rel:
        return "not a plain relative path"
    if rel.startswith("/"):
        return "absolute path; a manifest names files relative to its directory"
    if ".." in PurePosixPath(rel).parts:
        return "path leaves the directory (a '..' component)"
    if os.path.normpath(rel) != rel:
        return "not a plain relative path (write it as " + repr(os.path.normpath(rel)) + ")"
    return None


def path_problem(root: Path, rel: object, size: int | None = None, max_bytes: int | None = None,
                 fix: str | None = None) -> str | None:
    """Why `root`/`rel` is not a regular file inside `root` reached through regular directories only
    (every component by lstat), of `size` bytes and at most `max_bytes`, followed by `; fix`; None when it
    is. Reads no data."""
    problem = _path_problem(root, rel, size, max_bytes)
    if problem is None or fix is None or problem.startswith("cannot read"):
        return problem
    return f"{problem}; {fix}"


def _path_problem(root: Path, rel: object, size: int | None, max_bytes: int | None) -> str | None:
    problem = unsafe(rel)
    if problem is not None:
        return problem
    assert isinstance(rel, str)
    parts = PurePosixPath(rel).parts
    current = Path(root)
    for i, part in enumerate(parts):
        current = current / part
        shown = "/".join(parts[: i + 1])
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return "missing"
        except NotADirectoryError:
            return f"{'/'.join(parts[:i])} is not a directory"
        except OSError as exc:
            return f"cannot read ({exc.strerror}); check its permissions"
        if stat.S_ISLNK(st.st_mode):
            return (f"{shown} is a symlink (to {_readlink(current)}); files a manifest names must be regular "
                    "files inside its directory")
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            return f"{shown} is not a directory"
        if last and not stat.S_ISREG(st.st_mode):
            return "not a regular file (a directory, pipe, socket or device)"
    on_disk = st.st_size
    if size is not None and on_disk != size:
        return f"{on_disk} bytes on disk, manifest says {size} (truncated or replaced)"
    if max_bytes is not None and on_disk > max_bytes:
        return f"{on_disk / 2**20:.1f} MiB, over the {max_bytes / 2**20:.1f} MiB allowed for it"
    return None


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def open_checked(root: Path, rel: str, size: int | None = None, max_bytes: int | None = None):
    """A binary file object for `root`/`rel`, after path_problem (IntegrityError naming `rel` if any),
    opened without following a link or blocking."""
    problem = path_problem(root, rel, size, max_bytes)
    if problem is not None:
        raise IntegrityError(f"{rel}: {problem}")
    fd = os.open(Path(root) / rel, _NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IntegrityError(f"{rel}: not a regular file")
    return os.fdopen(fd, "rb")


def sha256_of(f) -> str:
    """sha256 of an open binary file from its start, in CHUNK pieces."""
    import hashlib

    h = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def file_problem(root: Path, rel: object, size: int | None, sha256: object, max_bytes: int | None = None,
                 fix: str | None = None) -> str | None:
    """Why a file a manifest vouches for is not the one it describes (path, kind, size, sha256), followed
    by `; fix`, or None."""
    problem = path_problem(root, rel, size, max_bytes, fix)
    if problem is not None:
        return problem
    assert isinstance(rel, str)
    try:
        with open_checked(root, rel) as f:
            digest = sha256_of(f)
    except OSError as exc:
        return f"cannot read ({exc.strerror}); check its permissions"
    except IntegrityError as exc:
        return str(exc).removeprefix(f"{rel}: ")
    if digest != sha256:
        shown = sha256[:12] if isinstance(sha256, str) else repr(sha256)
        return f"sha256 {digest[:12]}... does not match the manifest's {shown}... (corrupted or modified)" + (
            f"; {fix}" if fix else "")
    return None


def listed(names: Iterable[object]) -> set[str]:
    """The names a manifest lists that can name a file inside its directory (the others fail where used)."""
    return {n for n in names if unsafe(n) is None}  # type: ignore[misc]


# -- .npz arrays, from their headers -----------------------------------------------------------------------


def npz_declared(path: Path, names: tuple[str, ...], where: str) -> dict[str, tuple[tuple[int, ...], object]]:
    """(shape, dtype) that each array of an .npz declares in its .npy header, read without decompressing
    the data: what loading it would allocate is known before anything is allocated. KeyError(name) for
    a missing array."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    found = {}
    with zipfile.ZipFile(path) as z:
        for name in names:
            try:
                member = z.open(f"{name}.npy")
            except KeyError:
                raise KeyError(name) from None
            with member:
                version = npy.read_magic(member)
                reader = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
                if reader is None:
                    raise DataError(f"{where}: {name}.npy is .npy format {version}; pass arrays saved by numpy.savez")
                shape, _, dtype = reader(member)
            found[name] = (tuple(int(d) for d in shape), np.dtype(dtype))
    return found


def read_split(path: Path, where: str, max_bytes: int | None, sample_shape: list, classes: int | None,
               labels: bool = True, what: str = "verify allows itself"):
    """(inputs float32, labels int64) of an evaluation .npz, refused in one DataError line when its headers
    declare more than `max_bytes` or objects, an array is missing, the shapes do not fit [n, *sample_shape]
    with n labels, or a label is outside [0, classes) (`classes` None: not checked). `labels` False: the
    inputs only (labels are returned empty)."""
    import numpy as np

    names = ("inputs", "labels") if labels else ("inputs",)
    try:
        if max_bytes is not None:
            _declared(path, where, names, max_bytes, what)
        with np.load(path, allow_pickle=False) as z:
            arrays = [np.asarray(z[n]) for n in names]
    except KeyError as exc:
        raise DataError(f"{where}: has no array {exc}; an evaluation set holds `inputs` and `labels`") from None
    except DataError:
        raise
    except Exception as exc:  # not a zip, truncated, pickled objects
        raise DataError(f"{where}: not a readable .npz without pickles ({type(exc).__name__}); "
                        "pass the file edgeq export wrote, or re-run it") from None
    x = arrays[0]
    y = arrays[1] if labels else np.zeros(len(x) if x.ndim else 0, np.int64)
    if x.dtype != np.float32 or list(x.shape[1:]) != list(sample_shape) or y.ndim != 1 or len(y) != len(x) \
            or not len(x):
        raise DataError(f"{where}: inputs {x.dtype} {list(x.shape)} and labels {list(y.shape)} do not fit the "
                        f"manifest's input float32 [batch, {', '.join(map(str, sample_shape))}]; pass matching arrays")
    out_of_range = classes is not None and y.max() >= classes
    if labels and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or out_of_range):
        raise DataError(f"{where}: labels must be integers in [0, {classes}); pass the matching labels")
    return np.ascontiguousarray(x), y.astype(np.int64)


def _declared(path: Path, where: str, names: tuple[str, ...], max_bytes: int, what: str) -> None:
    """Refuse an .npz whose headers declare Python objects, or more than `max_bytes` once loaded."""
    declared = npz_declared(path, names, where)
    if any(dtype.hasobject for _, dtype in declared.values()):
        raise DataError(f"{where}: holds Python objects (pickles); pass an .npz of plain numeric arrays")
    total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in declared.values())
    if total > max_bytes:
        shape, dtype = declared["inputs"]
        raise DataError(f"{where}: its arrays declare {total / 2**30:.2f} GiB once loaded (inputs {dtype} "
                        f"{list(shape)}), over the {max_bytes / 2**30:.2f} GiB {what} ({EVAL_SHARE:g} of "
                        "--memory-limit); pass a smaller evaluation set or raise --memory-limit")


# -- the private copy -----------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What copying a bundle found: files that could not be read (relative name -> problem)."""

    root: Path
    source: Path
    unreadable: dict[str, str] = field(default_factory=dict)

    def shown(self, text: str) -> str:
        """A message about the copy, naming the user's directory instead."""
        return text.replace(str(self.root), str(self.source))


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> list[Path]:
    """Remove private copies (`edgeq-verify-<pid>-*`, `edgeq-device-<pid>-*`) in TMPDIR that belong to this
    user and whose process is gone: what a SIGKILLed run left."""
    removed = []
    tmp = Path(tempfile.gettempdir())
    for kind in KINDS:
        for path in tmp.glob(f"edgeq-{kind}-*-*"):
            pid = path.name[len(f"edgeq-{kind}-"):].split("-", 1)[0]
            try:
                st = path.lstat()
            except OSError:
                continue
            if pid.isdigit() and stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def private_dir(kind: str, hard_stop: bool = False) -> Iterator[Path]:
    """A new directory only this user can enter (0700) in TMPDIR, named with this process's pid, removed
    with everything in it afterwards, on SIGTERM and SIGINT too. Stale copies of dead runs go first.

    `hard_stop`, for a process that runs models itself (the device checker): a runtime busy in its own code
    (an ONNX Loop of 10^15 steps) never lets the KeyboardInterrupt of a signal be raised, so a signal that the
    block has not answered within STOP_GRACE_S removes the directory and ends the process (`_stop_watch`)."""
    clean_stale()
    with terminate_as_interrupt():  # before the folder exists: a SIGTERM from here on removes it
        try:
            root = Path(tempfile.mkdtemp(prefix=f"edgeq-{kind}-{os.getpid()}-"))
        except OSError as exc:
            raise IntegrityError(f"TMPDIR {tempfile.gettempdir()}: cannot create {kind}'s private copy there "
                                 f"({exc.strerror}); point TMPDIR at a writable directory") from None
        try:
            with _stop_watch(root) if hard_stop else contextlib.nullcontext():
                yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)


STOP_GRACE_S = 3.0


@contextlib.contextmanager
def _stop_watch(root: Path) -> Iterator[None]:
    """A thread that hears SIGTERM and SIGINT as they arrive (Python's wake-up fd, written by the C-level
    handler even while the main thread is inside a runtime) and, when the block has not ended STOP_GRACE_S
    later, removes `root` and exits 130 with the one line an interrupted command ends with."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    done = threading.Event()

    def watch() -> None:
        try:
            while os.read(r, 1):
                if not done.wait(STOP_GRACE_S):
                    shutil.rmtree(root, ignore_errors=True)
                    os.write(2, b"edgeq: interrupted (a runtime was busy in its own code: stopped)\n")
                    os._exit(130)
        except OSError:
            pass

    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    thread = threading.Thread(target=watch, name="edgeq-stop-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous)
        os.close(w)  # the thread's read ends
        thread.join(timeout=STOP_GRACE_S)
        os.close(r)


_SIGNALS: list[int] = []  # every SIGTERM / SIGINT a terminate_as_interrupt block received, in order


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what `timeout`, CI and `docker stop` send) raises KeyboardInterrupt in the block, as SIGINT
    does, so that the same clean-up runs; the previous handlers are restored after. Main thread only.

    The exception lands wherever the process is, and some libraries swallow it there (an import that
    fails halfway and is caught as an ImportError, a callback whose errors are logged): every signal is
    also recorded, and a block that received one ends in KeyboardInterrupt however it ended, so a
    swallowed interrupt never lets the work it stopped count as finished (`raise_if_interrupted` checks
    it mid-block, before a publish). SIGINT keeps being ignored where this process started with it
    ignored (a shell's background job)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        _SIGNALS.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    seen = len(_SIGNALS)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig, handler in previous.items():
        if sig == signal.SIGTERM or handler is signal.default_int_handler:
            signal.signal(sig, interrupt)
    try:
        yield
        raise_if_interrupted(seen)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_if_interrupted(seen: int = 0) -> None:
    """KeyboardInterrupt when a signal was recorded after the first `seen`: a swallowed interrupt still stops."""
    if len(_SIGNALS) > seen:
        raise KeyboardInterrupt(f"signal {_SIGNALS[-1]}")


def signals_received() -> int:
    """How many signals the terminate_as_interrupt blocks have recorded so far (a mark for raise_if_interrupted)."""
    return len(_SIGNALS)


def end_interrupted(message: str) -> int:
    """Print the one line an interrupted command ends with; returns its exit code, 130, which the process
    then exits with:
    - A signal that arrives from here on is ignored: a second Ctrl-C or SIGTERM during the interpreter's
      shutdown would otherwise turn the exit into a death by signal, halfway through the clean-up.
    - CPython marks the interrupt unhandled when its KeyboardInterrupt left an `exec` or `eval` of a string
      on the way out (libraries run such strings to define dataclasses and named tuples, so an interrupt
      that lands during an import can), even though it was handled here; under `python -m edgeq` it then
      ends the process by SIGINT instead of exiting 130. A string exec that completes clears the mark
      (CPython 3.10-3.13 reset it at the start of every such exec; 3.14 does not, gh-128130)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    exec("")  # noqa: S102  (clears CPython's "unhandled KeyboardInterrupt" mark; see above)
    print(message, file=sys.stderr, flush=True)
    return 130


def snapshot(directory: Path, root: Path, full: Callable[[str], bool], only: Iterable[str] | None = None,
             what: str = "the private copy") -> Snapshot:
    """Copy `directory` into `root` without following any link; every later check and every measurement
    reads the copy, which nobody else writes to, so a file swapped after it was checked is never run.

    Regular files for which `full(relative name)` holds are copied byte for byte (holes stay holes); the
    others become empty files of the same size (their names, kinds and sizes are all the directory checks
    read). Symlinks are recreated as symlinks (never followed) and special files as FIFOs, so the checks
    report them as they would in `directory`. `only`: top-level names to copy (default all). Entries
    already in `root` (an earlier pass) are kept. Each file is read once, in CHUNK-sized pieces. Nothing
    is ever deleted or written outside `root`.
    """
    snap = Snapshot(root, directory)
    keep = None if only is None else set(only)
    sizes: list[int] = []

    def count(rel: str, st: os.stat_result, parent: int) -> None:
        if stat.S_ISREG(st.st_mode) and full(rel):
            sizes.append(_allocated(st))

    _walk(directory, keep, count)
    _check_room(directory, root, sum(sizes), what)
    _walk(directory, keep, lambda rel, st, parent: _copy_one(snap, rel, st, parent, full(rel), what))
    return snap


MAX_DEPTH = 32  # folders below a bundle's top: an export has two


def _walk(directory: Path, keep: set[str] | None, visit: Callable[[str, os.stat_result, int], None]) -> None:
    """visit(relative name, lstat, parent directory fd) for everything below `directory`, parents first,
    sorted. Each folder is opened with O_NOFOLLOW relative to its parent's fd, so a folder swapped for a
    link mid-walk is never entered; `keep`: the top-level names to visit (None: all)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
    top = os.open(directory, flags)
    try:
        _visit_dir(top, "", keep, visit, flags | os.O_NOFOLLOW)
    finally:
        os.close(top)


def _visit_dir(fd: int, prefix: str, keep: set[str] | None, visit, flags: int) -> None:
    if prefix.count("/") > MAX_DEPTH:
        raise IntegrityError(f"{prefix.rstrip('/')}: folders nested more than {MAX_DEPTH} deep; an export is "
                             "two deep: remove them")
    try:
        names = sorted(os.listdir(fd))
    except OSError:
        if not prefix:
            raise
        return  # an unreadable folder: the files listed in it are missing from the copy, and fail as such
    for name in names:
        if keep is not None and not prefix and name not in keep:
            continue
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while listed: absent from the copy, as it now is from the directory
        visit(f"{prefix}{name}", st, fd)
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, flags, dir_fd=fd)
            except OSError:
                continue  # swapped for a link, or removed, since: not entered
            try:
                _visit_dir(sub, f"{prefix}{name}/", None, visit, flags)
            finally:
                os.close(sub)


def _copy_one(snap: Snapshot, rel: str, st: os.stat_result, parent: int, full: bool, what: str) -> None:
    dst = snap.root / rel  # rel comes from the walk (plain names), never from a manifest
    if os.path.lexists(dst):
        return  # copied by an earlier pass
    name = rel.rsplit("/", 1)[-1]
    try:
        if stat.S_ISDIR(st.st_mode):
            dst.mkdir(mode=0o700)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=parent), dst)
        elif not stat.S_ISREG(st.st_mode):
            os.mkfifo(dst, 0o600)
        elif full:
            _copy_file(snap.source / rel, name, parent, dst)
        else:
            _placeholder(dst, st.st_size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_room(snap.source, snap.root, None, what) from None
        snap.unreadable[rel] = f"{rel}: cannot read ({exc.strerror}); check its permissions"
        with contextlib.suppress(OSError):
            _placeholder(dst, 0)


def _copy_file(src: Path, name: str, parent: int, dst: Path) -> None:
    """Byte for byte, in CHUNK pieces; all-zero pieces are skipped (seek), so a sparse file stays sparse.
    Opened relative to its folder's descriptor (`src` only names it), without following a link and
    without blocking: a file swapped for a FIFO or a link after it was listed becomes the same in the copy."""
    try:
        f = open(src, "rb", opener=lambda _, flags: os.open(name, flags | _NOFOLLOW, dir_fd=parent))
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a link since it was listed
            os.symlink(os.readlink(name, dir_fd=parent), dst)
            return
        raise
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            os.mkfifo(dst, 0o600)
            return
        with open(dst, "xb") as out:
            for start, end in _data_extents(f.fileno()):
                f.seek(start)
                out.seek(start)
                while (left := end - f.tell()) > 0 and (chunk := f.read(min(CHUNK, left))):
                    if chunk == _ZEROS[: len(chunk)]:
                        out.seek(len(chunk), os.SEEK_CUR)
                    else:
                        out.write(chunk)
            out.truncate(os.fstat(f.fileno()).st_size)


def _data_extents(fd: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the parts of a file that hold data: its holes are never read, so a sparse file of any
    apparent size (`truncate -s 100G`) costs what it holds (SEEK_DATA / SEEK_HOLE; the whole file where the
    filesystem does not tell)."""
    size = os.fstat(fd).st_size
    if not hasattr(os, "SEEK_DATA"):
        yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                return
            yield pos, size  # the filesystem cannot tell: read it all
            return
        yield start, min(end, size)
        pos = end


def _placeholder(dst: Path, size: int) -> None:
    if not os.path.lexists(dst):
        with open(dst, "xb") as out:
            out.truncate(size)


def _allocated(st: os.stat_result) -> int:
    """Bytes a copy will occupy: the blocks the file really uses (a sparse file's holes are not copied)."""
    return min(st.st_size, getattr(st, "st_blocks", st.st_size // 512 + 1) * 512)


def _check_room(directory: Path, root: Path, need: int, what: str) -> None:
    if shutil.disk_usage(root).free < need + COPY_MARGIN:
        raise _no_room(directory, root, need, what)


def _no_room(directory: Path, root: Path, need: int | None, what: str) -> IntegrityError:
    free = shutil.disk_usage(root).free
    size = f" (it needs about {(need + COPY_MARGIN) / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free)" if need else ""
    return IntegrityError(f"TMPDIR {root.parent}: no room for {what} of {directory}{size}; the files are checked "
                          "and run from a private copy so that nobody can swap a file after it was checked: free "
                          "some space there, or point TMPDIR at a disk with room")


def leftover_of_export(directory: Path) -> Path | None:
    """The newest `.<name>.old-*` folder beside a missing `directory`: the previous export, moved aside by
    an export that was killed before its new build took its place."""
    directory = Path(directory)
    found = [p for p in directory.parent.glob(f".{directory.name}.old-*") if p.is_dir() and not p.is_symlink()]
    return max(found, key=lambda p: p.lstat().st_mtime) if found else None


def missing_directory(directory: Path, fix: str) -> str:
    """One line for a bundle directory that does not exist, naming a killed export's previous copy if any."""
    old = leftover_of_export(directory)
    if old is not None:
        return (f"{directory}: no such directory, but {old} holds the export it replaced (an export was killed "
                f"while publishing): restore it with `mv {old} {directory}`, or run `edgeq export --out "
                f"{directory}` again, which restores it first")
    return f"{directory}: no such directory; {fix}"


def output_problem(path: Path, directory: Path) -> str | None:
    """Why a report cannot be written to `path` by a run that checks `directory`, or None: a path inside the
    bundle (its manifest, any file of it, through a link too) would change what is being checked; a folder
    or a read-only place fails now rather than after the whole run."""
    path = Path(path)
    try:
        inside = path.resolve().is_relative_to(Path(directory).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return "cannot resolve it; choose another path"
    if inside:
        return f"inside {directory}, the bundle being checked: writing there would change it; choose a path outside it"
    if path.is_dir():
        return "is a directory; pass a file path"
    if os.path.lexists(path):
        return None if os.access(path, os.W_OK) else "cannot write (read-only); choose a writable path"
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a directory; choose a path in a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write in {folder} (read-only); choose a writable path"
    return None
