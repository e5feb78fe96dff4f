"""Is each file the one the manifest describes, and is every file in the directory accounted for?

Checked before anything is loaded. An artifact's file must stay inside the artifacts directory (no
absolute paths, no `..`), be a regular file reached without a symlink, and match the manifest's
byte count and sha256; an ONNX file must hold all its tensors. Every other name in the directory is
either ours (manifest.json, the signature, an empty .gitkeep) or reported as unlisted; a symlink or
special file anywhere in it is a problem. Each problem is one line naming the file.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeq import bundle
from edgeq.errors import EdgeqError, IntegrityError, ManifestError, SignatureError
from edgeq.manifest import MANIFEST_NAME, Artifact, Manifest
from edgeq.signing import GITKEEP, SIGNATURE_NAME

REEXPORT = "re-run `edgeq export`"
OURS = (MANIFEST_NAME, SIGNATURE_NAME)  # expected in every artifacts directory besides the artifacts
# the private copy and the safe reader live in edgeq.bundle, shared with the device checker
CHUNK, EVAL_SHARE, Snapshot = bundle.CHUNK, bundle.EVAL_SHARE, bundle.Snapshot


def resolve(directory: Path, file: str) -> tuple[Path | None, str | None]:
    """(path, None) for a regular file inside `directory` (edgeq.bundle's rules), or (None, problem)."""
    problem = bundle.path_problem(directory, file)
    return (None, f"{file}: {problem}") if problem else (Path(directory) / file, None)


def check_artifact(directory: Path, art: Artifact) -> list[str]:
    """Problems with one artifact's file: empty when it is present, inside, and byte-identical. (An ONNX
    file's external data is checked where it is parsed: in the verify worker, under its memory cap.)"""
    return check_file(directory, art.file, art.bytes, art.sha256)


def check_file(directory: Path, file: str, size: int, sha256: str) -> list[str]:
    """Problems with a file the manifest vouches for: empty when it is a regular file inside the
    directory (no symlink on its path) with the manifest's byte count and sha256 (edgeq.bundle)."""
    problem = bundle.file_problem(directory, file, size, sha256, fix=REEXPORT)
    return [f"{file}: {problem}"] if problem else []


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
    Problems: symlinks and special files, except artifacts' own files, which fail their rows.
    """
    directory = Path(directory)
    files = bundle.listed(manifest.listed_files())
    artifacts = bundle.listed(a.file for a in manifest.artifacts)
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
                if rel not in artifacts:  # an artifact's link fails its row
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

COPY = "verify's private copy"


@contextlib.contextmanager
def private_dir() -> Iterator[Path]:
    """edgeq.bundle's private directory for verify: 0700 in TMPDIR, named with verify's pid, removed at the
    end, on SIGTERM and SIGINT too, or by the next run if this one is killed."""
    with bundle.private_dir("verify") as root:
        yield root


def snapshot(directory: Path, root: Path, full: Callable[[str], bool]) -> Snapshot:
    """edgeq.bundle.snapshot, as verify's private copy."""
    return bundle.snapshot(directory, root, full, what=COPY)


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
    one the manifest is copied and read first, then the files it lists are copied whole and every other
    entry as a placeholder (see `snapshot`). The copy is only ever created: nothing a manifest names is
    deleted, here or in `directory`."""
    from edgeq import signing
    from edgeq.manifest import read

    key = None if public_key is None else signing.check_public_key(public_key)  # read once, before anything
    if not directory.is_dir():  # the usual one-line errors, before anything is copied
        if not os.path.lexists(directory):
            raise ManifestError(bundle.missing_directory(directory, f"run `edgeq export --out {directory}` first"))
        if public_key is not None:
            signing.verify_signature(directory, public_key, key)
        read(directory)
    if public_key is not None:
        snap = snapshot(directory, root, lambda rel: True)
        with shown_as(snap):
            if snap.unreadable:
                raise SignatureError(f"{min(snap.unreadable.values())} (signature {signing.SIGNATURE_NAME})")
            return snap, signing.verify_signature(root, public_key, key), read(root)
    snap = bundle.snapshot(directory, root, lambda rel: True, only=(MANIFEST_NAME,), what=COPY)
    with shown_as(snap):
        if MANIFEST_NAME in snap.unreadable:
            raise ManifestError(f"{directory / MANIFEST_NAME}: {snap.unreadable[MANIFEST_NAME].split(': ', 1)[1]}")
        manifest = read(root)
    listed = bundle.listed(manifest.listed_files()) | set(OURS)
    snap.unreadable.update(snapshot(directory, root, lambda rel: rel in listed).unreadable)
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
    # the decisions the files were built with, and the calibration inputs a device plans on: tampering fails the run
    for p in [manifest.plan, manifest.dataset.get("calibration")]:
        if p:
            directory_problems += ([snap.unreadable[p["file"]]] if p["file"] in snap.unreadable else
                                   check_file(root, p["file"], p["bytes"], p["sha256"]))
    for split in ("eval", "val"):  # without them nothing can be measured
        file = (manifest.dataset.get(split) or {}).get("file")
        if file in snap.unreadable:
            raise IntegrityError(snap.unreadable[file])
    return problems, unlisted, directory_problems
