"""Is each file the one the manifest describes, and is every file in the directory accounted for?

Checked before anything is loaded. An artifact's file must stay inside the artifacts directory (no
absolute paths, no `..`), be a regular file reached without a symlink, and match the manifest's
byte count and sha256; an ONNX file must hold all its tensors. Every other name in the directory is
either ours (manifest.json, the signature, an empty .gitkeep) or reported as unlisted; a symlink or
special file anywhere in it is a problem. Each problem is one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.errors import DataError, EdgeqError, IntegrityError, ManifestError, SignatureError
from edgeq.manifest import MANIFEST_NAME, Artifact, Manifest, sha256_file
from edgeq.signing import GITKEEP, SIGNATURE_NAME

REEXPORT = "re-run `edgeq export`"
OURS = (MANIFEST_NAME, SIGNATURE_NAME)  # expected in every artifacts directory besides the artifacts


def resolve(directory: Path, file: str) -> tuple[Path | None, str | None]:
    """(path, None) for a file inside `directory`, or (None, problem) for one that leaves it."""
    if Path(file).is_absolute():
        return None, f"{file}: absolute path; manifest files must be relative to the artifacts directory"
    root = directory.resolve()
    path = (root / file).resolve()
    if not path.is_relative_to(root):
        return None, f"{file}: path leaves the artifacts directory {directory}; refusing to read it"
    return path, None


def check_artifact(directory: Path, art: Artifact) -> list[str]:
    """Problems with one artifact's file: empty when it is present, inside, and byte-identical. (An ONNX
    file's external data is checked where it is parsed: in the verify worker, under its memory cap.)"""
    return check_file(directory, art.file, art.bytes, art.sha256)


def check_file(directory: Path, file: str, size: int, sha256: str) -> list[str]:
    """Problems with a file the manifest vouches for: empty when it is a regular file inside the
    directory (no symlink on its path) with the manifest's byte count and sha256."""
    link = None if Path(file).is_absolute() else _symlink_on_path(directory, file)
    if link is not None:
        return [f"{file}: {link} is a symlink (to {os.readlink(directory / link)}); artifacts must be "
                f"regular files inside the directory: {REEXPORT}"]
    path, problem = resolve(directory, file)
    if path is None:
        return [problem or file]
    if not path.exists():
        return [f"{file}: missing; {REEXPORT}"]
    if not path.is_file():
        return [f"{file}: not a regular file; {REEXPORT}"]
    on_disk = path.stat().st_size
    if on_disk != size:
        return [f"{file}: {on_disk} bytes on disk, manifest says {size} (truncated or replaced); {REEXPORT}"]
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return [f"{file}: cannot read ({exc.strerror}); check its permissions"]
    if digest != sha256:
        return [f"{file}: sha256 {digest[:12]}... does not match the manifest's {sha256[:12]}... "
                f"(corrupted or modified); {REEXPORT}"]
    return []


def _symlink_on_path(directory: Path, file: str) -> str | None:
    """The first component of `file` under `directory` that is a symlink (lstat, never followed)."""
    current = Path(directory)
    for part in Path(file).parts:
        current = current / part
        if current.is_symlink():
            return current.relative_to(directory).as_posix()
    return None


def external_data(path: Path, file: str) -> list[str]:
    """Refuse an ONNX file whose tensors live in a sidecar file: one problem naming both.

    Refused rather than hashed: the exporter always writes self-contained ONNX files, and a sidecar
    is not in the manifest, so its bytes are covered by no hash and could be edited freely while the
    .onnx still matches. Files onnx cannot parse are left to the runtime, which names the problem.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a parsable model: the runtime load reports it
        return []
    external = [t for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return []
    sidecars = sorted({e.value for t in external for e in t.external_data if e.key == "location"}) or ["(unnamed)"]
    return [f"{file}: tensors stored in external data file {', '.join(sidecars)}, which no manifest hash covers; "
            f"edgeq ships self-contained ONNX files: {REEXPORT}"]


def _tensors(model) -> list:
    """Every tensor of an ONNX model: initializers, sparse initializers and tensor attributes, in
    the main graph, in subgraphs (If/Loop/Scan bodies) and in local functions."""
    found: list = []

    def graph(g) -> None:
        found.extend(g.initializer)
        for sparse in g.sparse_initializer:
            found.extend((sparse.values, sparse.indices))
        nodes(g.node)

    def nodes(items) -> None:
        for node in items:
            for attr in node.attribute:
                if attr.HasField("t"):
                    found.append(attr.t)
                found.extend(attr.tensors)
                if attr.HasField("sparse_tensor"):
                    found.extend((attr.sparse_tensor.values, attr.sparse_tensor.indices))
                for sparse in attr.sparse_tensors:
                    found.extend((sparse.values, sparse.indices))
                if attr.HasField("g"):
                    graph(attr.g)
                for sub in attr.graphs:
                    graph(sub)

    graph(model.graph)
    for function in model.functions:
        nodes(function.node)
    return found


def check_all(directory: Path, manifest: Manifest) -> dict[str, list[str]]:
    """Problems per artifact name, for every artifact the manifest lists."""
    return {a.name: check_artifact(Path(directory), a) for a in manifest.artifacts}


def check_directory(directory: Path, manifest: Manifest) -> tuple[list[str], list[str]]:
    """(unlisted, problems) for everything in `directory`, recursively, without following links.

    Unlisted: files and directories (with a trailing /) that neither the manifest nor OURS names.
    Problems: symlinks and special files, except the manifest's own files, which fail their rows.
    """
    directory = Path(directory)
    files = {os.path.normpath(f) for f in manifest.listed_files() if not Path(f).is_absolute()}
    parents = {str(p) for f in files for p in Path(f).parents if str(p) != "."}
    unlisted: list[str] = []
    problems: list[str] = []

    def cannot_list(exc: OSError) -> None:
        problems.append(f"{exc.filename}: cannot list ({exc.strerror}); fix its permissions")

    for root, dirs, names in os.walk(directory, onerror=cannot_list):
        dirs.sort()
        for name in sorted(dirs + names):
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                if rel not in files:  # an artifact's link fails its row
                    problems.append(f"{rel}: a symlink (to {os.readlink(path)}); an artifacts directory holds "
                                    "regular files only: remove it")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                problems.append(f"{rel}: not a regular file or directory (a socket, pipe or device?): remove it")
            elif rel in files or rel in parents or rel in OURS or _empty_gitkeep(rel, path):
                continue
            else:
                unlisted.append(rel + "/" * stat.S_ISDIR(mode))
    return unlisted, problems


def _empty_gitkeep(rel: str, path: Path) -> bool:
    """The exporter keeps a git-tracked artifacts/.gitkeep: an empty regular file at the top."""
    return rel == GITKEEP and path.is_file() and path.stat().st_size == 0


# -- the private copy: verify measures exactly the bytes it checked --------------------------------------

CHUNK = 1 << 20  # bytes per read while copying and hashing: memory stays flat whatever the file size
_ZEROS = bytes(CHUNK)
EVAL_SHARE = 0.25  # of verify's memory limit: the most the evaluation arrays may declare (copies are held)
COPY_MARGIN = 16 << 20  # bytes of slack asked of TMPDIR beyond the copy itself


@dataclass
class Snapshot:
    """What copying an artifacts directory found: files that could not be read (relative name -> problem)."""

    root: Path
    source: Path
    unreadable: dict[str, str] = field(default_factory=dict)

    def shown(self, text: str) -> str:
        """A message about the copy, naming the user's directory instead."""
        return text.replace(str(self.root), str(self.source))


@contextlib.contextmanager
def private_dir() -> Iterator[Path]:
    """A new directory only this user can enter (0700) in TMPDIR, removed with everything in it afterwards."""
    try:
        root = Path(tempfile.mkdtemp(prefix="edgeq-verify-"))
    except OSError as exc:
        raise IntegrityError(f"TMPDIR {tempfile.gettempdir()}: cannot create verify's private copy there "
                             f"({exc.strerror}); point TMPDIR at a writable directory") from None
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def snapshot(directory: Path, root: Path, full: Callable[[str], bool]) -> Snapshot:
    """Copy `directory` into `root` without following any link; every later check and every measurement
    reads the copy, which nobody else writes to, so a file swapped after it was checked is never measured.

    Regular files for which `full(relative name)` holds are copied byte for byte (holes stay holes);
    the others become empty files of the same size (their names, kinds and sizes are all the directory
    checks read). Symlinks are recreated as symlinks and special files as FIFOs, so the checks report
    them as they would in `directory`. Each file is read once, in CHUNK-sized pieces.
    """
    snap = Snapshot(root, directory)
    entries = _entries(directory)
    _check_room(directory, root, sum(_allocated(st) for rel, st in entries if stat.S_ISREG(st.st_mode) and full(rel)))
    for rel, st in entries:
        if (root / rel).exists() or (root / rel).is_symlink():
            continue  # copied by an earlier pass
        try:
            _copy_entry(directory / rel, root / rel, st, full(rel))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_room(directory, root) from None
            snap.unreadable[rel] = f"{rel}: cannot read ({exc.strerror}); check its permissions"
            _placeholder(root / rel, 0)
    return snap


def _entries(directory: Path) -> list[tuple[str, os.stat_result]]:
    """(relative name, lstat) of everything under `directory`, parents before children, links not followed."""
    found: list[tuple[str, os.stat_result]] = []

    def cannot_list(exc: OSError) -> None:
        if Path(exc.filename) == directory:
            raise exc

    for top, dirs, names in os.walk(directory, onerror=cannot_list):
        dirs.sort()
        for name in sorted(dirs + names):
            path = Path(top) / name
            try:
                found.append((path.relative_to(directory).as_posix(), path.lstat()))
            except FileNotFoundError:
                continue  # removed while listed: absent from the copy, as it is now from the directory
    return found


def _copy_entry(src: Path, dst: Path, st: os.stat_result, full: bool) -> None:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        dst.mkdir(mode=0o700)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
    elif not stat.S_ISREG(mode):
        os.mkfifo(dst, 0o600)
    elif full:
        _copy_file(src, dst)
    else:
        _placeholder(dst, st.st_size)


def _copy_file(src: Path, dst: Path) -> None:
    """Byte for byte, in CHUNK pieces; all-zero pieces are skipped (seek), so a sparse file stays sparse.
    Opened without following a link and without blocking: a file swapped for a FIFO or a link after it
    was listed becomes the same in the copy."""
    with open(src, "rb", opener=_no_follow) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            os.mkfifo(dst, 0o600)
            return
        with open(dst, "xb") as out:
            while chunk := f.read(CHUNK):
                if chunk == _ZEROS[: len(chunk)]:
                    out.seek(len(chunk), os.SEEK_CUR)
                else:
                    out.write(chunk)
            out.truncate()


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


def _placeholder(dst: Path, size: int) -> None:
    if not dst.exists():
        with open(dst, "xb") as out:
            out.truncate(size)


def _allocated(st: os.stat_result) -> int:
    """Bytes a copy will occupy: the blocks the file really uses (a sparse file's holes are not copied)."""
    return min(st.st_size, getattr(st, "st_blocks", st.st_size // 512 + 1) * 512)


def _check_room(directory: Path, root: Path, need: int) -> None:
    if shutil.disk_usage(root).free < need + COPY_MARGIN:
        raise _no_room(directory, root, need)


def _no_room(directory: Path, root: Path, need: int | None = None) -> IntegrityError:
    free = shutil.disk_usage(root).free
    size = f" (it needs about {(need + COPY_MARGIN) / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free)" if need else ""
    return IntegrityError(f"TMPDIR {root.parent}: no room for verify's private copy of {directory}{size}; verify "
                          "measures a private copy so that nobody can swap a file after it was checked: free some "
                          "space there, or point TMPDIR at a disk with room")


@contextlib.contextmanager
def shown_as(snap: Snapshot) -> Iterator[None]:
    """Errors raised about the copy name the user's directory."""
    try:
        yield
    except EdgeqError as exc:
        raise type(exc)(snap.shown(str(exc))) from None


def checked_copy(directory: Path, root: Path, public_key: str | None) -> tuple[Snapshot, dict, Manifest]:
    """Copy `directory` into `root`, then check the signature (with a key) and read the manifest, both
    from the copy. With a key every file is copied whole, since the signature covers every byte; without
    one only the manifest and the files it lists are (see `snapshot`)."""
    from edgeq import signing
    from edgeq.manifest import read

    key = None if public_key is None else signing.check_public_key(public_key)  # read once, before anything
    if not directory.is_dir():  # the usual one-line errors, before anything is copied
        if public_key is not None:
            signing.verify_signature(directory, public_key, key)
        read(directory)
    if public_key is not None:
        snap = snapshot(directory, root, lambda rel: True)
        with shown_as(snap):
            if snap.unreadable:
                raise SignatureError(f"{min(snap.unreadable.values())} (signature {signing.SIGNATURE_NAME})")
            return snap, signing.verify_signature(root, public_key, key), read(root)
    snap = snapshot(directory, root, lambda rel: rel in OURS)
    with shown_as(snap):
        if MANIFEST_NAME in snap.unreadable:
            raise ManifestError(f"{directory / MANIFEST_NAME}: {snap.unreadable[MANIFEST_NAME].split(': ', 1)[1]}")
        manifest = read(root)
    listed = {os.path.normpath(f) for f in manifest.listed_files()}
    for rel in listed | set(OURS):
        if (root / rel).is_file() and not (root / rel).is_symlink():
            (root / rel).unlink()  # a placeholder from the pass above: copied whole now
    snap.unreadable.update(snapshot(directory, root, lambda rel: rel in listed or rel in OURS).unreadable)
    return snap, signing.signature_status(root, None), manifest


def check_copy(snap: Snapshot, manifest: Manifest) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """(problems per artifact, unlisted names, directory problems) of the copy; a file that could not be
    read fails as such, not as a size or hash mismatch."""
    root = snap.root
    problems = check_all(root, manifest)
    for art in manifest.artifacts:
        unreadable = snap.unreadable.get(os.path.normpath(art.file))
        if unreadable:
            problems[art.name] = [unreadable]
    unlisted, directory_problems = check_directory(root, manifest)
    if manifest.plan:  # the decisions the files were built with: tampering with them fails the run
        p = manifest.plan
        directory_problems += ([snap.unreadable[p["file"]]] if p["file"] in snap.unreadable else
                               check_file(root, p["file"], p["bytes"], p["sha256"]))
    for split in ("eval", "val"):  # without them nothing can be measured
        file = (manifest.dataset.get(split) or {}).get("file")
        if file in snap.unreadable:
            raise IntegrityError(snap.unreadable[file])
    return problems, unlisted, directory_problems


def npz_declared(path: Path, names: tuple[str, ...], where: str) -> dict[str, tuple[tuple[int, ...], object]]:
    """(shape, dtype) that each array of an .npz declares in its .npy header, read without decompressing
    the data: what loading it would allocate is known before anything is allocated."""
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


def check_declared(path: Path, where: str, max_bytes: int) -> None:
    """Refuse an .npz whose `inputs` and `labels` headers declare more than `max_bytes` once loaded."""
    declared = npz_declared(path, ("inputs", "labels"), where)
    if any(dtype.hasobject for _, dtype in declared.values()):
        raise DataError(f"{where}: holds Python objects (pickles); pass an .npz of plain numeric arrays")
    total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in declared.values())
    if total > max_bytes:
        shape, dtype = declared["inputs"]
        raise DataError(f"{where}: its arrays declare {total / 2**30:.2f} GiB once loaded (inputs {dtype} "
                        f"{list(shape)}), over the {max_bytes / 2**30:.2f} GiB verify allows itself "
                        f"({EVAL_SHARE:g} of --memory-limit); pass a smaller evaluation set or raise --memory-limit")
